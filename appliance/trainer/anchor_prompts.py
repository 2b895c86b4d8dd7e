"""The general-ability anchor: generic prompts whose answers must stay close to the base model's own.

A module rather than a data file, so it travels in the wheel with the trainer that reads it (every
tier, every bundle) and no site data can change it. Short questions with short answers: a few dozen
greedy tokens each show whether the model still writes plain, fresh text about the world.
Changing a prompt changes the cache key of the base model's reference answers (outcome.py).
"""

from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "Name three primary colors.",
    "What is 12 plus 7?",
    "Write one sentence about the ocean.",
    "What do bees make?",
    "Translate 'thank you' into Spanish.",
    "What is the opposite of hot?",
    "Give me a synonym for happy.",
    "Why is the sky blue? Answer in one sentence.",
    "What is water made of?",
    "List the four seasons.",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How do I boil an egg?",
    "What is a noun?",
    "Suggest a name for a pet cat.",
    "What does a thermometer measure?",
    "Say hello in a friendly way.",
    "What is the freezing point of water in Celsius?",
)
