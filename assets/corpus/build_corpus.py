"""Build ``smollm2_chat.txt``, the bundled corpus ADED's tri-gram table starts from (speculative.md §4).

ADED builds its table from chat data (UltraChat); bundling that is out of reach offline, so the corpus is
SmolLM2-135M-Instruct's own answers to the varied, self-written prompts below (none is from the Spec-Bench
subset in assets/benchmarks), sampled once at temperature 0.7 / top-p 0.9 with a fixed seed. Rerun with
``python assets/corpus/build_corpus.py`` (a few minutes on CPU); answers are separated by blank lines.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine import load_model

PROMPTS = [
    "Explain how photosynthesis works.", "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?", "How do I make a cup of tea?",
    "Summarize the causes of the French Revolution.", "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?", "Give me tips for a job interview.",
    "Describe the water cycle.", "Write a poem about autumn leaves.", "How does a car engine work?",
    "What is machine learning?", "Explain the theory of relativity in simple terms.",
    "Write an email asking my manager for a day off.", "What are some healthy breakfast ideas?",
    "How do vaccines work?", "Compare cats and dogs as pets.", "Write a haiku about the sea.",
    "What is the capital of Australia and what is it known for?", "How can I improve my sleep?",
    "Explain what a black hole is.", "Write a function in JavaScript that sums an array.",
    "What are the main parts of a cell?", "Give me a recipe for pancakes.", "Why is the sky blue?",
    "How do I learn a new language quickly?", "Describe the plot of Romeo and Juliet.",
    "What is climate change and why does it matter?", "Write a product description for a water bottle.",
    "Explain recursion with an example.", "What are the planets of the solar system?",
    "How does the internet work?", "Write a motivational message for a student before an exam.",
    "What is the difference between weather and climate?", "List five tips for saving money.",
    "Explain how a bill becomes a law in the United States.", "Write a dialogue between a teacher and a student.",
    "What are prime numbers? Give examples.", "How do plants grow from seeds?",
    "Translate 'Good morning, how are you?' into French and Spanish.", "Describe a day in the life of a farmer.",
    "What is the role of the heart in the human body?", "Write a SQL query that counts rows in a table.",
    "Explain supply and demand.", "What should I pack for a camping trip?", "Who was Albert Einstein?",
    "How do I write a good essay introduction?", "Describe the history of the printing press.",
]


def main() -> None:
    model = load_model("smollm2-135m-instruct")
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    answers = []
    for start in range(0, len(PROMPTS), 8):
        batch = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS[start : start + 8]]
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.model.generate(**inputs, max_new_tokens=320, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(start, flush=True)
    Path(__file__).with_name("smollm2_chat.txt").write_text("\n\n".join(a.strip() for a in answers) + "\n")


if __name__ == "__main__":
    main()
