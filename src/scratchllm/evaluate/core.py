"""The CORE suite: which task files, run how, and the score that sums them up.

CORE (DCLM, Li et al. 2024; the number nanochat reports) runs 22 in-context tasks; the 18 of them
in the project's data (`$SCRATCHLLM_TEST_DATA/eval`, the MosaicML eval-gauntlet files) are below,
with DCLM's settings (`eval/heavy.yaml`, `eval_meta_data_v1.csv`): the shape, the number of
few-shot examples, the random baseline in percent and the delimiter between the question and its
answer. bigbench_language_identification's baseline is 25, not DCLM's 9.1: that number is for
the 11-way original, and this file has 4 choices.

Each task's accuracy is centred on its baseline, (acc − b/100) / (1 − b/100), so chance scores
0 and perfection 1; CORE is the mean of the centred scores over the tasks run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchllm.errors import InputError
from scratchllm.evaluate.tasks import TaskSpec

ANSWER = "\nAnswer: "


@dataclass(frozen=True)
class CoreTask:
    file: str
    type: str
    shots: int
    baseline: float
    delimiter: str = " "


# name (DCLM's label) → settings. Order: the data README's table.
CORE_TASKS: dict[str, CoreTask] = {
    "agi_eval_lsat_ar": CoreTask("agi_eval_lsat_ar.jsonl", "multiple_choice", 3, 20),
    "arc_challenge": CoreTask("arc_challenge.jsonl", "multiple_choice", 10, 25, ANSWER),
    "arc_easy": CoreTask("arc_easy.jsonl", "multiple_choice", 10, 25, ANSWER),
    "bigbench_cs_algorithms": CoreTask("bigbench_cs_algorithms.jsonl", "language_modeling", 10, 0),
    "bigbench_dyck_languages": CoreTask(
        "bigbench_dyck_languages.jsonl", "language_modeling", 10, 0
    ),
    "bigbench_language_identification": CoreTask(
        "bigbench_language_identification.jsonl", "multiple_choice", 10, 25
    ),
    "bigbench_operators": CoreTask("bigbench_operators.jsonl", "language_modeling", 10, 0),
    "bigbench_qa_wikidata": CoreTask("bigbench_qa_wikidata.jsonl", "language_modeling", 10, 0),
    "bigbench_repeat_copy_logic": CoreTask(
        "bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, 0
    ),
    "boolq": CoreTask("boolq.jsonl", "multiple_choice", 10, 62, ANSWER),
    "commonsense_qa": CoreTask("commonsense_qa.jsonl", "multiple_choice", 10, 20),
    "copa": CoreTask("copa.jsonl", "multiple_choice", 0, 50),
    "jeopardy": CoreTask("jeopardy_all.jsonl", "language_modeling", 10, 0, ANSWER),
    "lambada_openai": CoreTask("lambada_openai.jsonl", "language_modeling", 0, 0),
    "openbook_qa": CoreTask("openbook_qa.jsonl", "multiple_choice", 0, 25),
    "piqa": CoreTask("piqa.jsonl", "multiple_choice", 10, 50, ANSWER),
    "winograd": CoreTask("winograd_wsc.jsonl", "schema", 0, 50),
    "winogrande": CoreTask("winogrande.jsonl", "schema", 0, 50),
}


def default_eval_dir() -> Path:
    """Where the CORE files are: `$SCRATCHLLM_TEST_DATA/eval`, else `../shared/data/eval` from
    the working directory, else beside this source checkout."""
    env = os.environ.get("SCRATCHLLM_TEST_DATA")
    if env:
        return Path(env) / "eval"
    here = Path("../shared/data/eval")
    if here.is_dir():
        return here.resolve()
    return Path(__file__).resolve().parents[4] / "shared" / "data" / "eval"


def core_suite(
    names: Iterable[str] | None = None, eval_dir: str | Path | None = None
) -> list[TaskSpec]:
    """The CORE tasks named (all 18 for None or `core`), as `TaskSpec`s over `eval_dir`."""
    wanted = list(names) if names is not None else ["core"]
    if "core" in wanted:
        wanted = [n for n in wanted if n != "core"] + [n for n in CORE_TASKS if n not in wanted]
    unknown = [n for n in wanted if n not in CORE_TASKS]
    if unknown:
        raise InputError(
            f"--tasks {unknown[0]!r}: unknown task; expected core or one of {', '.join(CORE_TASKS)}"
        )
    directory = Path(eval_dir) if eval_dir is not None else default_eval_dir()
    if not directory.is_dir():
        raise InputError(
            f"CORE task files: no directory {directory}; set SCRATCHLLM_TEST_DATA or pass "
            "--eval-dir to the folder that holds the .jsonl files"
        )
    specs = []
    for name in dict.fromkeys(wanted):  # once each, in the order asked
        task = CORE_TASKS[name]
        specs.append(
            TaskSpec(
                name, directory / task.file, task.type, task.shots, task.delimiter, task.baseline
            )
        )
    return specs


def centered(accuracy: float, baseline: float) -> float:
    """(acc − b/100) / (1 − b/100): 0 at chance, 1 at perfection (`baseline` in percent)."""
    b = baseline / 100.0
    return (accuracy - b) / (1.0 - b)


def core_score(centered_scores: Sequence[float]) -> float:
    """The mean centred score over the tasks run (NaN for none)."""
    return sum(centered_scores) / len(centered_scores) if centered_scores else math.nan
