"""Benchmark prompts: varied chat questions, or random token ids (host side)."""

from __future__ import annotations

import random
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "Give me three tips for learning Python.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the main differences between a list and a tuple in Python, and when should I use each?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "Write a short story about a robot who learns to paint, in under one hundred words.",
    "List five fruits that are rich in vitamin C.",
    "How do vaccines work?",
    "What is the Pythagorean theorem? Give an example with numbers.",
    "Suggest a name for a bakery that specializes in sourdough bread.",
    "Describe the water cycle step by step.",
    "What should I pack for a three-day hiking trip in the mountains in autumn?",
    "Write an email to my manager asking for a day off next Friday.",
    "Explain recursion to a beginner programmer, with a small example.",
    "What is the difference between weather and climate?",
    "Give me a recipe for a simple tomato pasta sauce.",
    "Who painted the Mona Lisa, and when?",
    "What are black holes?",
    "Write a limerick about a cat who loves cheese.",
    "How can I improve my sleep? Give practical advice.",
    "Explain the difference between RAM and storage in a computer.",
    "What is photosynthesis?",
    "Compose a two-line motivational quote for Monday morning.",
    "How does a bicycle stay upright when it is moving?",
    "Name the planets of the solar system in order from the sun.",
    "I have eggs, spinach and cheese. What can I cook for breakfast?",
    "Explain what inflation is and why it matters to ordinary people.",
    "Write a friendly welcome message for new members of a chess club.",
    "What is machine learning, in simple terms?",
]


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """n chat-templated questions (cycling through the list) as token ids."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("--dataset chat needs a model with a chat template; use --dataset random")
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False).input_ids))
    return out


def random_prompts(vocab_size: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random token ids (ids 10.. avoid most special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(length)] for _ in range(n)]
