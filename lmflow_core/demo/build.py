"""Rebuild the bundled demo assets: the conversation dataset, the tokenizer and the model config.

Run ``python -m lmflow_core.demo.build`` after changing this file; the output is deterministic and committed,
so installing lmflow needs no build step. The dataset is synthetic (arithmetic, opposites, spelling,
counting, days, capitals and small talk), small enough that a 4-layer model learns it on two CPU cores in a
minute, with answers whose structure is easy to see being learnt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("old", "new"),
    ("early", "late"),
    ("strong", "weak"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("left", "right"),
    ("wet", "dry"),
    ("near", "far"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("long", "short"),
    ("clean", "dirty"),
]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
]
WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "book",
    "fish",
    "bird",
    "rain",
    "snow",
    "milk",
    "bread",
    "apple",
    "house",
    "river",
    "stone",
    "cloud",
    "green",
    "water",
    "light",
    "music",
    "table",
    "chair",
    "paper",
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks a lot.", "Happy to help!"),
    ("Who are you?", "I am a small demo assistant trained with lmflow."),
    ("What can you do?", "I can do small sums, spell words, count, and name opposites, days and capitals."),
]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant.", "Answer briefly and correctly."]


def qa(rng: random.Random) -> tuple[str, str]:
    """One question and its answer, from a random topic."""
    topic = rng.randrange(8)
    if topic == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}."]), f"{a} plus {b} is {a + b}."
    if topic == 1:
        a = rng.randint(0, 30)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if topic == 2:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if topic == 3:
        word, other = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            word, other = other, word
        return f"What is the opposite of {word}?", f"The opposite of {word} is {other}."
    if topic == 4:
        word = rng.choice(WORDS)
        return f"How do you spell {word}?", f"{word} is spelled {'-'.join(word)}."
    if topic == 5:
        start = rng.randint(1, 15)
        end = start + rng.randint(2, 6)
        return f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1)) + "."
    if topic == 6:
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
        return f"What day comes before {DAYS[i]}?", f"{DAYS[(i - 1) % 7]} comes before {DAYS[i]}."
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def conversation(rng: random.Random) -> dict:
    """A one- to three-turn conversation, sometimes with a greeting or a system prompt."""
    messages = []
    if rng.random() < 0.2:
        user, assistant = rng.choice(GREETINGS)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        question, answer = qa(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    record: dict = {"messages": messages}
    if rng.random() < 0.25:
        record["system"] = rng.choice(SYSTEMS)
    return record


def build_dataset() -> tuple[dict, dict]:
    rng = random.Random(1234)
    train = [conversation(rng) for _ in range(1200)]
    evaluation = [conversation(rng) for _ in range(64)]
    return (
        {"type": "conversation", "instances": train},
        {"type": "conversation", "instances": evaluation},
    )


def corpus_lines(*datasets: dict) -> list[str]:
    """Text the tokenizer is trained on: every message of the demo data."""
    lines = []
    for data in datasets:
        for record in data["instances"]:
            lines += [record.get("system", "")] + [m["content"] for m in record["messages"]]
    return [line for line in lines if line]


def build_tokenizer(lines: list[str], out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer (any text encodes) and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out_dir)
    return len(wrapped)


def build_model_config(vocab_size: int, out_dir: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=SPECIAL.index("<|im_end|>"),
        pad_token_id=SPECIAL.index("<|endoftext|>"),
    )
    config.save_pretrained(out_dir)


def main() -> None:
    train, evaluation = build_dataset()
    data_dir = HERE / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
    (data_dir / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False) + "\n")
    model_dir = HERE / "model"
    model_dir.mkdir(exist_ok=True)
    vocab = build_tokenizer(corpus_lines(train, evaluation), model_dir)
    build_model_config(vocab, model_dir)
    print(f"wrote {data_dir} and {model_dir} (vocabulary {vocab})")


if __name__ == "__main__":
    main()
