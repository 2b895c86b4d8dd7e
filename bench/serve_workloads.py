"""The serving benchmark's workloads: what each client sends, turn by turn.

- `short`: the short chat prompts the bench has always used, one turn each.
- `shared-prefix`: a RAG-like system prompt of about 1,500 tokens (a site handbook), the same in every
  request, followed by a different question each time.
- `multi-turn`: conversations of a few turns; each turn resends the whole history, the model's own
  earlier answers included.
- `long_prompt`: one prompt of about 2,000 tokens that shares nothing with the others but the chat
  template (the long-prompt-among-live-streams case).

Everything is built from fixed lists, so every contender and every run sends the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Message = dict[str, str]

PROMPTS = [f"Write a short story about {x}." for x in (
    "a lighthouse keeper", "a lost robot", "a river in winter", "a baker at dawn", "a mountain village",
    "an old clock", "a kite on the beach", "a library at night", "a red bicycle", "a fox in the snow",
    "a ship in a bottle", "the first day of school", "a garden after rain", "a train at midnight",
    "a cat on the roof", "a letter never sent")]

_UNITS = ("Radiology", "Cardiology", "the pharmacy", "the blood bank", "Outpatient Surgery", "the laboratory",
          "Pediatrics", "the emergency desk", "Oncology", "Physiotherapy", "the records office", "Dermatology")
_BUILDINGS = ("North", "East", "Harbor", "Garden", "West", "Hill")
_RULES = (
    "Visitors sign in at the front desk and wear a badge at all times.",
    "Samples are labelled with the patient's name, date of birth and the time they were taken.",
    "Orders placed after 16:00 are processed the next working day unless marked urgent.",
    "Staff badges are renewed every twelve months by the security office on the ground floor.",
    "Medication fridges are checked twice a day and the temperature is written in the log book.",
    "Appointments cancelled less than a day ahead are offered to the waiting list first.",
    "Patient files never leave the building; copies are requested through the records office.",
)

QUESTIONS = (
    "When does Radiology open on weekdays?", "Which extension do I call for the blood bank?",
    "Where is the pharmacy?", "What happens to orders placed after 16:00?",
    "How often are medication fridges checked?", "Who renews staff badges?",
    "Can patient files be taken home?", "Which building is Pediatrics in?",
    "What is the extension of the laboratory?", "When does Oncology close?",
    "What do visitors have to do when they arrive?", "Who gets a cancelled appointment?",
    "How are samples labelled?", "Where is Physiotherapy?", "When does the emergency desk open?",
    "Which floor is Dermatology on?")

FOLLOW_UPS = ("Continue the story with what happens next.", "Now tell the same story from another character's view.",
              "Give the story a title and a one-line summary.", "Rewrite the ending so that it is happy.")

_LOG_PARTS = ("pump", "valve", "filter", "compressor", "boiler", "sensor", "fan", "belt", "gasket", "relay")
_LOG_FINDINGS = ("was replaced after a leak", "showed wear and was cleaned", "read slightly high and was recalibrated",
                 "made a noise under load and was tightened", "passed the monthly check without remarks")


def handbook(sections: int = 23) -> str:
    """The shared system prompt: a site handbook of `sections` short, fact-dense sections."""
    lines = ["You are the help desk assistant of Riverside General Hospital. Answer staff questions using only "
             "the handbook below; if the handbook does not say, answer that you do not know.", "", "HANDBOOK"]
    for i in range(sections):
        unit, building = _UNITS[i % len(_UNITS)], _BUILDINGS[i % len(_BUILDINGS)]
        opens, closes = 6 + i % 4, 16 + i % 5
        lines.append(f"Section {i + 1}. {unit} is in the {building} building, floor {1 + i % 6}. It is open from "
                     f"{opens:02d}:00 to {closes}:30 on weekdays; call extension {4000 + 7 * i}. {_RULES[i % len(_RULES)]}")
    return "\n".join(lines)


def maintenance_log(entries: int = 59) -> str:
    """About 2,000 tokens of text unlike the handbook, with a request to summarize it."""
    lines = ["Summarize the following maintenance log in three sentences.", ""]
    for i in range(entries):
        part, finding = _LOG_PARTS[i % len(_LOG_PARTS)], _LOG_FINDINGS[i % len(_LOG_FINDINGS)]
        lines.append(f"Day {i + 1}: in plant room {1 + i % 9}, the {part} number {100 + 13 * i} {finding}; "
                     f"the technician logged {1 + i % 4} hours.")
    return "\n".join(lines)


@dataclass(frozen=True)
class Conversation:
    """A client's conversation: an optional system prompt and the user's turns, sent one after another."""

    turns: tuple[str, ...]
    system: str = ""

    def messages(self, turn: int, answers: list[str]) -> list[Message]:
        """What turn `turn` sends: the system prompt, every earlier turn with its answer, then this turn."""
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs the {turn} answers before it, got {len(answers)}")
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for k in range(turn):
            out += [{"role": "user", "content": self.turns[k]}, {"role": "assistant", "content": answers[k]}]
        return [*out, {"role": "user", "content": self.turns[turn]}]


def short(n: int) -> list[Conversation]:
    return [Conversation((PROMPTS[i % len(PROMPTS)],)) for i in range(n)]


def shared_prefix(n: int) -> list[Conversation]:
    system = handbook()
    return [Conversation((QUESTIONS[i % len(QUESTIONS)],), system) for i in range(n)]


def multi_turn(n: int, turns: int = 3) -> list[Conversation]:
    return [Conversation((PROMPTS[i % len(PROMPTS)], *FOLLOW_UPS[:turns - 1])) for i in range(n)]


def long_prompt() -> Conversation:
    return Conversation((maintenance_log(),))


WORKLOADS: dict[str, Callable[[int], list[Conversation]]] = {
    "short": short, "shared-prefix": shared_prefix, "multi-turn": multi_turn}
