"""The bundle path of the embedding model: the demo spec names it for every tier, a tier naming a wrong
one fails the build, and an install decrypts it into place and writes [embeddings] into appliance.toml
(an upgrade to a release without one drops the section, a rollback writes it again)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.config import load_config
from tests.embedding_fixtures import EMBED_ID

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def test_the_demo_spec_carries_the_embedding_model_and_every_tier_names_it(minilm_dir):
    from installer.planning.tiers import models_of, parse_tiers
    from installer.toolchain.spec import load_spec
    from tests.bundle_fixtures import REPO

    spec = load_spec(REPO / "bundles/demo.toml")
    model = next(m for m in spec.models if m.id == EMBED_ID)
    assert (model.backend, model.format, model.context_length) == ("transformers", "safetensors", 256)
    assert {f.name: f.source for f in model.files} == {name: minilm_dir / name for name in MINILM_FILES}
    tiers = parse_tiers(spec.tiers, models_of(spec.models))
    assert [t.embeddings for t in tiers] == [EMBED_ID] * len(tiers)
    assert [t.embedding_settings(4)["device"] for t in tiers] == ["cuda", "cuda", "cpu", "cpu"]  # CUDA torch only beside transformers


def embedding_spec(where: Path, minilm: Path, sequence: int, with_embeddings: bool) -> Path:
    from tests.install_fixtures import installable_spec
    from tests.spec_files import write_spec

    chat = where / f"chat-{sequence}.bin"
    chat.write_bytes(os.urandom(4096))
    spec = installable_spec(chat, sequence, name="emb")
    if with_embeddings:
        spec["models"].append({"id": EMBED_ID, "backend": "transformers", "format": "safetensors", "context_length": 256,
                               "files": [{"name": n, "source": minilm / n} for n in MINILM_FILES]})
        spec["tiers"][0]["embeddings"] = EMBED_ID
    return write_spec(where / f"emb-{sequence}.toml", spec)


@pytest.mark.slow
def test_install_places_the_embedding_model_and_names_it_in_appliance_toml(tmp_path, minilm_dir, capsys):
    from appliance.cli import main
    from appliance.engines.embeddings import load_embedder
    from appliance.paths import Layout
    from installer.toolchain.build import build_bundle
    from installer.toolchain.keygen import keygen
    from installer.toolchain.spec import load_spec

    keygen(tmp_path / "keys")
    bundles = {}
    for seq, with_embeddings in ((1, True), (2, False)):
        bundles[seq] = tmp_path / f"bundle-{seq}"
        build_bundle(load_spec(embedding_spec(tmp_path, minilm_dir, seq, with_embeddings)), bundles[seq],
                     tmp_path / "keys/signing.key", sequence=seq, model_key_path=tmp_path / "keys/model.key")
    root = tmp_path / "root"
    common = ["--root", str(root), "--yes", "--no-systemd", "--key-file", str(tmp_path / "keys/model.key")]
    assert main(["install", str(bundles[1]), *common, "--trust", str(tmp_path / "keys/signing.pub")]) == 0, capsys.readouterr().err
    layout = Layout.at(root)
    config = load_config(layout)
    assert config.embeddings is not None
    assert (config.embeddings.id, config.embeddings.context_length, config.embeddings.device) == (EMBED_ID, 256, "cpu")
    placed = config.embeddings.resolve_path(layout)
    assert placed.parent == layout.models and sorted(p.name for p in placed.iterdir()) == sorted(MINILM_FILES)
    assert (placed / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
    embedder = load_embedder(config.embeddings, layout, lambda _inputs, _tokens: None)  # what the server loads at start
    embedder.start()
    try:
        assert embedder.warm_up() == "384 dimensions on cpu"
    finally:
        embedder.close()

    # A release without one drops the section the installer wrote; a rollback writes it again.
    assert main(["upgrade", str(bundles[2]), *common]) == 0, capsys.readouterr().err
    assert load_config(layout).embeddings is None and "[embeddings]" not in layout.config_file.read_text()
    assert main(["rollback", *common[:4]]) == 0, capsys.readouterr().err
    assert load_config(layout).embeddings == config.embeddings


@pytest.mark.parametrize("embeddings, words", [
    ("nope", "names the embedding model 'nope', which the bundle does not have"),
    ("chat", "names 'chat' both as its model and as its embedding model"),
    ("other-gguf", "which is for llama.cpp; embedding models run on transformers"),
    (7, "embeddings = 7 has the wrong type"),
])
def test_a_tier_naming_a_wrong_embedding_model_fails_the_build_naming_it(embeddings, words):
    from appliance.errors import TierError
    from installer.planning.tiers import parse_tiers

    models = {"chat": ("llama.cpp", 2048), "other-gguf": ("llama.cpp", 2048), EMBED_ID: ("transformers", 256)}
    with pytest.raises(TierError, match=words):
        parse_tiers([{"name": "cpu", "model": "chat", "embeddings": embeddings}], models)
    assert parse_tiers([{"name": "cpu", "model": "chat", "embeddings": EMBED_ID}], models)[0].embeddings == EMBED_ID
