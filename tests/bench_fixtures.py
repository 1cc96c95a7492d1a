"""Tiny local copies of the benchmarks, one parquet each, in the columns and value formats that their
lmms-eval 0.7.3 task reads (taken from the task YAML and its `utils.py`). A few items each: they prove
that an item of every benchmark goes through dsvlm's class and lmms-eval's scoring, not what a model
scores on the real data."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40)]
MC = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


def image(i: int, size: int = 32) -> dict[str, Any]:
    """A small square of one colour on grey, as a parquet image cell."""
    picture = Image.new("RGB", (size, size), (128, 128, 128))
    picture.paste(COLOURS[i % len(COLOURS)], (8, 8, size - 8, size - 8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def answer(i: int) -> str:
    return "ABCD"[i % 4]


def mmbench(i: int) -> dict[str, Any]:
    return {
        "index": i,
        "question": "What colour is the shape ?",
        "hint": None,
        **MC,
        "answer": answer(i),
        "category": ["color", "count"][i % 2],
        "L2-category": "perception",
        "source": "fixture",
        "split": "dev",
        "image": image(i),
    }


def mmstar(i: int) -> dict[str, Any]:
    question = "What colour is the shape?\nOptions: A: red, B: green, C: blue, D: yellow"
    category = ["coarse perception", "fine-grained perception"][i % 2]
    return {
        "index": i,
        "question": question,
        "answer": answer(i),
        "category": category,
        "l2_category": "colour",
        "meta_info": {"source": "fixture"},
        "image": image(i),
    }


def mmmu(i: int) -> dict[str, Any]:
    multiple = i % 2 == 0
    return {
        "id": f"validation_Art_{i + 1}",
        "question": "<image 1> What colour is the shape?" if multiple else "<image 1> How many shapes are there?",
        "options": str(list(MC.values())) if multiple else "[]",
        "answer": answer(i) if multiple else "1",
        "question_type": "multiple-choice" if multiple else "open",
        "image_1": image(i),
        **{f"image_{k}": None for k in range(2, 8)},
        "img_type": "['Diagrams']",
        "topic_difficulty": "Easy",
        "subfield": "Colour",
        "explanation": "",
    }


def mathvista(i: int) -> dict[str, Any]:
    multi = i % 2 == 0
    question = "What colour is the shape?" if multi else "How many shapes are there?"
    choices = list(MC.values()) if multi else None
    return {
        "pid": str(i + 1),
        "question": question,
        "query": f"Hint: Please answer the question.\nQuestion: {question}",
        "image": f"images/{i + 1}.jpg",
        "decoded_image": image(i),
        "choices": choices,
        "unit": None,
        "precision": None,
        "answer": MC[answer(i)] if multi else "1",
        "question_type": "multi_choice" if multi else "free_form",
        "answer_type": "text" if multi else "integer",
        "metadata": {
            "split": "testmini",
            "source": "fixture",
            "task": "figure question answering",
            "context": "synthetic scene",
            "grade": "elementary school",
            "skills": ["colour"],
            "language": "english",
        },
        "caption": "",
        "ocr": "",
    }


def ocrbench(i: int) -> dict[str, Any]:
    types = ["Regular Text Recognition", "Scene Text-centric VQA", "Key Information Extraction"]
    return {
        "dataset": ["IIIT5K", "textVQA", "FUNSD"][i % 3],
        "question": "What is written in the image?",
        "question_type": types[i % 3],
        "answer": ["red"],
        "image": image(i),
    }


def ai2d(i: int) -> dict[str, Any]:
    return {
        "question": "What colour is the shape?",
        "options": list(MC.values()),
        "answer": str(i % 4),
        "image": image(i),
    }


def hallusionbench(i: int) -> dict[str, Any]:
    return {
        "category": ["VD", "VS"][i % 2],
        "subcategory": "chart",
        "visual_input": "1",
        "set_id": "0",
        "figure_id": str(i),
        "sample_note": "fixture",
        "question_id": str(i),
        "question": "Is the shape red?",
        "gt_answer_details": "The shape is red.",
        "gt_answer": str(i % 2),
        "filename": f"./hallusion_bench/VD/chart/{i}.png",
        "image": image(i),
    }


def llava_bench(i: int) -> dict[str, Any]:
    return {
        "question_id": str(i),
        "question": "Describe the image.",
        "image": image(i),
        "caption": "A coloured square on grey.",
        "gpt_answer": "A coloured square on a grey background.",
        "category": ["conv", "detail", "complex"][i % 3],
        "image_id": str(i),
    }


def scienceqa(i: int) -> dict[str, Any]:
    return {
        "image": image(i),
        "question": "Which colour is the shape?",
        "choices": list(MC.values())[:3],
        "answer": i % 3,
        "hint": "Look at the picture." if i % 2 else "",
        "task": "closed choice",
        "grade": "grade2",
        "subject": "natural science",
        "topic": "colour",
        "category": "Colours",
        "skill": "Identify colours",
        "lecture": "",
        "solution": "",
    }


def mme(i: int) -> dict[str, Any]:
    return {
        "question_id": f"color/{i // 2}.png",
        "question": "Is the shape red? Please answer yes or no.",
        "answer": ["Yes", "No"][i % 2],
        "category": ["color", "existence"][i // 2 % 2],
        "image": image(i),
    }


def mmvp(i: int) -> dict[str, Any]:
    # Pairs (1-2, 3-4): the same question, opposite answers.
    return {
        "Index": i + 1,
        "Question": "Is the shape red or blue?",
        "Options": "(a) Red (b) Blue",
        "Correct Answer": ["(a)", "(b)"][i % 2],
        "image": image(2 * (i % 2)),
    }


def cv_bench(i: int) -> dict[str, Any]:
    return {
        "idx": i,
        "type": ["2D", "3D"][i % 2],
        "task": ["Count", "Depth"][i % 2],
        "image": image(i),
        "question": "How many shapes are in the image?",
        "choices": ["0", "1", "2", "3"],
        "answer": f"({answer(i)})",
        "prompt": "How many shapes are in the image? Select from the following choices.\n(A) 0\n(B) 1\n(C) 2\n(D) 3",
        "filename": f"img/{i}.png",
        "source": ["ADE20K", "Omni3D"][i % 2],
        "source_dataset": "fixture",
        "source_filename": f"{i}.png",
        "target_class": None,
        "target_size": None,
        "bbox": None,
    }


ROWS: dict[str, Callable[[int], dict[str, Any]]] = {
    "mmbench": mmbench,
    "mmstar": mmstar,
    "mmmu": mmmu,
    "mathvista": mathvista,
    "ocrbench": ocrbench,
    "ai2d": ai2d,
    "hallusionbench": hallusionbench,
    "llava_bench": llava_bench,
    "scienceqa": scienceqa,
    "mme": mme,
    "mmvp": mmvp,
    "cv_bench": cv_bench,
}


def write_fixture(name: str, folder: Path, n: int = 4) -> Path:
    """`n` items of benchmark `name` as `folder/NAME.parquet`, image columns typed as images."""
    import datasets

    rows = [ROWS[name](i) for i in range(n)]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    dataset = datasets.Dataset.from_dict(columns)
    for key, values in columns.items():  # image cells, and MMMU's empty image_2..image_7
        if key[len("image_") :].isdigit() or any(isinstance(v, dict) and "bytes" in v for v in values):
            dataset = dataset.cast_column(key, datasets.Image())
    path = folder / f"{name}.parquet"
    datasets.disable_progress_bars()
    dataset.to_parquet(str(path))
    return path
