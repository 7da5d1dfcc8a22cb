"""utils/job_array.py: the embedding list of a job array (which line a task trains, output folders that must not
collide) and the summary of all tasks (tests/test_slurm.py runs the whole template on a real Slurm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import job_array as job_array_tool
from utils import job_array
from utils.errors import UserError


def _list(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "embeddings.txt"
    path.write_text(text)
    return path


def test_lines_are_split_like_a_shell_and_comments_skipped(tmp_path):
    path = _list(tmp_path, "# header\n\n--placeholder_token 'my cat' --output_dir runs/cat  # the cat\n"
                           "  --placeholder_token dog --output_dir \"runs/a dog\"\n")
    assert job_array.read_lines(path) == [["--placeholder_token", "my cat", "--output_dir", "runs/cat"],
                                          ["--placeholder_token", "dog", "--output_dir", "runs/a dog"]]


@pytest.mark.parametrize("text, message", [
    ("--placeholder_token 'open\n", "line 1: No closing quotation"),
    ("# nothing\n\n", "no embedding lines"),
])
def test_bad_lists_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        job_array.read_lines(_list(tmp_path, text))
    with pytest.raises(UserError, match="No such file"):
        job_array.read_lines(tmp_path / "missing.txt")


def test_a_task_takes_its_line_and_says_which_array_range_fits():
    lines = [["--a"], ["--b"], ["--c"]]
    assert job_array.lines_for_task(lines, 2) == [["--c"]]
    with pytest.raises(UserError, match=r"array task 3 has no line: the list has 3 embedding line\(s\), so submit "
                                        r"with --array=0-2"):
        job_array.lines_for_task(lines, 3)
    # the seam for several embeddings per task (one training job that trains several)
    assert job_array.lines_for_task(lines, 1, per_task=2) == [["--c"]]


def test_output_dir_from_flag_config_or_default(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: from-config\nlearning_rate: 0.01\n")
    assert job_array.output_dir_of(["--output_dir", "x"]) == "x"
    assert job_array.output_dir_of(["--output_dir=y", "--seed", "1"]) == "y"
    assert job_array.output_dir_of(["--config", str(config)]) == "from-config"
    assert job_array.output_dir_of(["--config", str(config), "--output_dir", "flag-wins"]) == "flag-wins"
    assert job_array.output_dir_of(["--seed", "1"]) == "outputs"  # the trainers' default


def test_lines_that_would_share_an_output_folder_are_refused(tmp_path):
    path = _list(tmp_path, "--placeholder_token a --output_dir runs/a\n--placeholder_token b\n--placeholder_token c\n")
    # lines 2 and 3 both fall back to the common --output_dir: they would overwrite each other's files
    with pytest.raises(UserError, match="lines 2 and 3 both write to .*runs/common; give each line its own"):
        job_array.task_args(path, 0, ["--output_dir", "runs/common"])
    ok = _list(tmp_path, "--output_dir runs/a\n--output_dir runs/b\n")
    assert job_array.task_args(ok, 1, ["--output_dir", "runs/common"]) == ["--output_dir", "runs/b"]


def test_args_command_prints_the_line_nul_separated(tmp_path, capsys):
    path = _list(tmp_path, "--output_dir a\n--placeholder_token 'b c' --output_dir b\n")
    assert job_array_tool.main(["args", str(path), "1", "--", "--seed", "1"]) == 0
    assert capsys.readouterr().out.split("\0") == ["--placeholder_token", "b c", "--output_dir", "b", ""]


def _record(folder: Path, task: int, outcome: str, out: Path, status=0, log="", tasks=3):
    job_array.record(folder, job_array.TaskRecord(task=task, tasks=tasks, job_id=str(100 + task), outcome=outcome,
                                                  status=status, restarts=1 if outcome == "stopped" else 0,
                                                  script="train_textual_inversion.py",
                                                  args=["--seed", "1", "--output_dir", str(out)], log=log))


def test_summary_rows_states_files_steps_and_errors(tmp_path):
    folder = tmp_path / "summary"
    a = tmp_path / "runs" / "a"
    a.mkdir(parents=True)
    (a / "cat.pt").write_bytes(b"x")
    (a / "learned_embeds.safetensors").write_bytes(b"x")
    (a / "textual_inversion_loss.csv").write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,0,0.5,0.1\n"
                                                   "2,0,1,0.25,0.1\n")
    log = tmp_path / "task-2.out"
    log.write_text("loading\ntrain_textual_inversion.py: error: unrecognized arguments: --bogus\n"
                   "srun: error: node1: task 0: Exited with exit code 2\n")
    _record(folder, 0, "done", a)
    _record(folder, 2, "failed", tmp_path / "runs" / "c", status=2, log=str(log))

    rows = json.loads((folder / "summary.json").read_text())
    assert [(r["task"], r["state"]) for r in rows] == [(0, "done"), (1, "no result"), (2, "failed")]
    assert rows[0]["files"] == ["cat.pt", "learned_embeds.safetensors"] and (rows[0]["step"], rows[0]["loss"]) == \
        (2, 0.25)
    assert rows[2]["error"] == "train_textual_inversion.py: error: unrecognized arguments: --bogus"
    text = (folder / "summary.txt").read_text()
    assert text.startswith("3 task(s): 1 done, 1 failed, 1 no result")
    assert "task 1: no result" in text and "unrecognized arguments: --bogus" in text

    # the last task to end completes the summary; a stopped task says how to finish it
    _record(folder, 1, "stopped", a)
    text = (folder / "summary.txt").read_text()
    assert text.startswith("3 task(s): 1 done, 1 failed, 1 stopped") and "submit the task again" in text
    assert job_array_tool.main(["summary", str(folder)]) == 0


def test_a_concepts_file_is_cut_into_tasks_of_per_task_embeddings(tmp_path):
    concepts = tmp_path / "c.csv"
    concepts.write_text("name,train_data_dir,num_vectors\n" + "".join(f"e{i},d{i},{1 + i % 2}\n" for i in range(7)))
    assert job_array.is_concepts_file(concepts) and not job_array.is_concepts_file(tmp_path / "list.txt")
    args = job_array.concepts_task_args(concepts, 3, 2, ["--output_dir", str(tmp_path / "runs")])
    out = tmp_path / "runs" / "task-00003"
    assert args == ["--concepts", str(out / "concepts.json"), "--output_dir", str(out)]
    assert json.loads((out / "concepts.json").read_text()) == [{"name": "e6", "train_data_dir": "d6",
                                                                 "num_vectors": "1"}]
    with pytest.raises(UserError, match=r"array task 4 has no line: the list has 7 .*--array=0-3"):
        job_array.concepts_task_args(concepts, 4, 2, ["--output_dir", str(tmp_path / "runs")])


def test_the_summary_of_a_batched_task_names_its_embeddings(tmp_path):
    out = tmp_path / "runs" / "task-00000"
    out.mkdir(parents=True)
    (out / "embeddings_summary.csv").write_text("name,steps\na,5\nb,5\n")
    (out / "many_embeddings_loss.csv").write_text("step,epoch,epoch_step,loss,learn_rate\n5,0,4,0.5,0.005\n")
    _record(tmp_path / "s", 0, "done", out, tasks=1)
    row = json.loads((tmp_path / "s" / "summary.json").read_text())[0]
    assert row["files"] == ["a/", "b/"] and row["step"] == 5
