"""Schemathesis against /openapi.json with every check: bad input never gives a 500, answers match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig

from appliance.server.app import Settings, create_app
from tests.embedding_fixtures import add_embeddings
from tests.scripted_engine import scripted_engine
from tests.server_fixtures import scripted_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(tmp_path_factory, minilm_dir):
    """The scripted model (tests/scripted_engine.py) with a short context (40 tokens): the shapes of
    requests and answers are what this checks, and valid requests finish quickly; and the real
    embedding model behind /v1/embeddings, with small limits."""
    base = tmp_path_factory.mktemp("st")
    root = scripted_root(base, context=40, max_batch=2, max_queue=4)
    add_embeddings(root, minilm_dir, max_inputs=4, context_length=64, max_request_tokens=128)
    engine = scripted_engine(root.config)
    cfg = root.config
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, embeddings=cfg.embeddings), engine)
    yield root, app
    # schemathesis starts the app's lifespan once and keeps it for the process; end it here.
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()


@pytest.fixture(scope="module")
def api_schema(small):
    root, app = small
    loaded = schemathesis.openapi.from_dict(app.openapi(), config=CONFIG)
    loaded.app = app
    return loaded


# All checks run. Two status lists are widened, each for a reason the schema cannot express:
# a body over [server] request_body_limit is 413 whatever its shape; and schema-valid requests may
# still meet runtime limits (prompt longer than the context: 400; queue full: 429; an unknown
# feedback id: 404; an adapter that fails to load: 409).
CONFIG = SchemathesisConfig.from_str("""
[checks]
negative_data_rejection.expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
positive_data_acceptance.expected-statuses = ["2XX", 400, 401, 403, 404, 409, 413, 429]
""")

schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_api_conforms(case, small):
    root, app = small
    key = root.admin_key
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"})
