"""The grid flow with the real Prefect (test server) and a real MLflow SQLite store, on the tiny
data: it trains every point once, skips what is done, records failures and goes on, and a
point killed with SIGKILL resumes to the same result with its one MLflow run."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from flows import devices, records, supervise, tasks
from flows.collect import collect
from flows.config import Point, RunConfig, check_batch_split
from flows.devices import device_slots
from flows.grid.__main__ import main
from flows.grid.flow import grid_flow
from flows.launch import Launch
from flows.plan import Job, chains, fingerprints, plan
from flows.tracking import Tracker
from flows.training.step import FAULT_ENV
from model.sizes import SIZES
from stages.params import Params, ParamsError, load_params, validate_params
from tests.flows.conftest import grid_params, write_params

# SQLAlchemy deprecations inside Prefect's server and MLflow's store: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
LOSSES = ("loss_caption", "loss_interleaved", "loss_text", "loss_avg", "train_loss", "D", "steps")


def run_grid(params: Path, data, results: Path, uri: str, **kw) -> dict:
    return grid_flow(
        params_path=str(params),
        shards=str(data.shards),
        codebook=str(data.shards / "none.pt"),  # early/late need no codebook
        results=str(results),
        tracking_uri=uri,
        **kw,
    )


def mlflow_runs(uri: str, study: str) -> tuple[list, list]:
    """(launch runs, point runs) of a study's experiment."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"nmm-{study}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kind = [(r.data.tags.get("nmm.kind"), r) for r in runs]
    return [r for k, r in kind if k == "launch"], [r for k, r in kind if k == "point"]


def by_id(table: Path) -> dict[str, dict]:
    return {r["point_id"]: r for r in records.read_table(table)}


def ids(params: dict, data, **point) -> list[str]:
    """Point ids of the grid points matching ``point`` (e.g. arch="early", tokens=4096)."""
    jobs = plan(validate_params(params), fingerprints(data.shards, None))
    match = [j for j in jobs if all(getattr(j.point, k) == v for k, v in point.items())]
    return [j.point_id for j in match]


# --------------------------------------------------------------------------- fast


def test_a_groups_points_chain_in_ascending_tokens(tiny_data):
    params = validate_params(
        grid_params(grid={"tokens": [4096, 1024, 2048], "sizes": ["xxs", "xs"]})
    )
    jobs = plan(params, fingerprints(tiny_data.shards, None))
    assert len(jobs) == 2 * 2 * 3 and len({j.point_id for j in jobs}) == 12
    groups = chains(jobs, shared_trunks=True)
    assert len(groups) == 4
    for chain in groups:
        assert [j.point.tokens for j in chain] == [1024, 2048, 4096]
        assert len({j.group_id for j in chain}) == 1
    assert [c[0].point.size for c in groups] == ["xs", "xs", "xxs", "xxs"]  # longest first
    alone = chains(jobs, shared_trunks=False)
    assert len(alone) == 12
    costs = [c[0].point.tokens * (SIZES[c[0].point.size].shape.width + 6) for c in alone]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


def test_the_fork_server_is_used_only_for_the_code_it_imported(monkeypatch):
    """A process that started the server and then plans with changed code (a long-lived
    process, a test session) gives each point a fresh interpreter instead."""
    monkeypatch.setattr(supervise, "_started", {})
    if sys.platform != "linux":
        assert supervise._server("a") is None
        return
    assert supervise._server("a") is not None
    assert supervise._server("a") is not None
    assert supervise._server("b") is None


def test_each_point_gets_one_gpu_or_one_pinned_cpu_thread(monkeypatch, tmp_path):
    import torch

    def launch(params: Params) -> Launch:
        return Launch(params, tmp_path, tmp_path, None, tmp_path, None, "rev", None)  # type: ignore[arg-type]

    # a machine with 4 usable GPUs (this one may have a CPU build of torch: devices' check of
    # the build and the driver answers as a GPU machine's would)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(
        devices, "cuda_unavailable", lambda: None if torch.cuda.device_count() else "no GPU"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    params = validate_params(grid_params(grid={"workers": 3}, train={"threads": 2}))
    assert device_slots(params) == ["2", "3", "5"]  # at most grid.workers, one GPU each
    env = launch(params).env("5")
    assert (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (
        "5",
        "2",
        "2",
    )
    cpu = validate_params(grid_params(train={"device": "cpu"}))
    assert device_slots(cpu) == [None, None]
    assert launch(cpu).env(None)["CUDA_VISIBLE_DEVICES"] == ""  # GPUs hidden
    two = validate_params(grid_params(grid={"workers": 3}, train={"processes": 2}))
    assert device_slots(two) == ["2,3", "5,7"]  # 2 GPUs a point, as many points as fit
    job = Job(RunConfig.build(two, Point("early", "xxs", 2048, "45-45-10", 0), None), "p", "g", "c")
    cmd = launch(two).command(job)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "points" / "p" / "config.json")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_slots(params) == [None] * 3
    with pytest.raises(ParamsError, match="train.device"):
        device_slots(validate_params(grid_params(train={"device": "cuda"})))


def test_runs_table_has_typed_columns_in_order_and_keeps_new_fields(tmp_path):
    ok = {"point_id": "a", "status": "ok", "N": 100.0, "loss_avg": 3, "moe": False, "new": 1.5}
    crash = records.crash_record(
        {"arch": "late", "size": "xs", "tokens": 8, "mixture": "m", "seed": 0},
        "b",
        "g",
        "c",
        "boom",
    )
    records.write_table([ok, crash], tmp_path / "runs.parquet")
    rows = records.read_table(tmp_path / "runs.parquet")
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "runs.parquet")
    assert schema.names == [*records.COLUMNS, "new"]
    assert str(schema.field("N").type) == "int64" and str(schema.field("loss_avg").type) == "double"
    assert rows[0]["N"] == 100 and rows[0]["new"] == 1.5
    assert rows[1]["new"] is None and rows[1]["status"] == "failed"
    assert rows[1]["error"] == "boom" and rows[1]["tokens_budget"] == 8 and rows[1]["N"] is None
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, then renamed


def test_a_point_keeps_one_run_across_launches_and_logs_each_step_once(tmp_path, mlflow_uri):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "tokens": 8, "train_loss": 5.0}\n{"step": 2, "tok')  # torn
    first = Tracker("unit", mlflow_uri)
    first.start_launch("launch-1", {"grid": {"archs": ["early"]}}, {}, [])
    run = first.start_point("p", "pid1", {"arch": "early"}, {"point.arch": "early", "x": 1})
    first.log_progress("pid1", metrics, [(0, 0, {"process_rss_megabytes": 1.0})])
    # killed here; the point resumes from step 1 and rewrites its later steps
    metrics.write_text(
        "".join(f'{{"step": {s}, "tokens": {8 * s}, "train_loss": {5.0 - s}}}\n' for s in (1, 2, 3))
    )
    second = Tracker("unit", mlflow_uri)
    assert second.needs_finish("pid1")
    second.start_launch("launch-2", {}, {}, [])
    assert second.start_point("p", "pid1", {"arch": "early"}, {"x": 2, "y": 3}) == run
    second.finish_point("pid1", {"status": "ok", "steps": 3, "loss_avg": 2.5}, metrics, [], {})
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(run, "train_loss")
    assert [m.step for m in history] == [1, 2, 3] and history[-1].value == 2.0
    got = client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.tags["status"] == "ok"
    assert got.data.params["x"] == "1" and got.data.params["y"] == "3"  # params never change
    assert got.data.tags["nmm.launch"] == second.parent_id
    assert got.data.metrics["final/loss_avg"] == 2.5
    assert not Tracker("unit", mlflow_uri).needs_finish("pid1")


def test_help_explains_run_plan_and_serve(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "plan" in out and "serve" in out and "grid.workers" in out


def test_the_fault_hook_is_not_a_parameter_of_the_flow():
    """Test hooks stay out of the flow's parameters (its run form in the Prefect UI)."""
    names = set(grid_flow.parameters.properties)
    assert names == {"params_path", "shards", "codebook", "results", "tracking_uri", "work_pool"}


def test_bad_params_stop_the_cli_before_prefect_starts(tmp_path, capsys):
    bad = write_params(tmp_path / "params.yaml", grid={"workers": 0})
    assert main(["run", "--params", str(bad)]) == 2
    assert "grid.workers" in capsys.readouterr().err


def test_processes_that_do_not_split_the_batch_stop_the_cli_before_any_compute(
    tiny_data, tmp_path, capsys
):
    """train.processes must divide every point's batch rows (4 here): 3 is refused with the
    sizes and the processes that would work, before Prefect starts or anything is written."""
    results = tmp_path / "results"
    bad = write_params(tmp_path / "params.yaml", train={"processes": 3})
    args = ["run", "--params", str(bad), "--shards", str(tiny_data.shards)]
    assert main([*args, "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "train.processes=3" in err and "early xxs (4 rows)" in err and "[1, 2, 4]" in err
    assert not results.exists()
    fp = fingerprints(tiny_data.shards, None)
    ok = validate_params(grid_params(train={"processes": 2}))
    check_batch_split([j.config for j in plan(ok, fp)])  # 2 rows a rank: no error
    # rows grow with N (batch_exponent 1): xxs 1 row, m 8; 4 processes split m only
    mixed = validate_params(
        grid_params(
            grid={"sizes": ["xxs", "m"]},
            train={"processes": 4, "batch_rows_ref": 2, "batch_exponent": 1.0},
        )
    )
    with pytest.raises(ParamsError, match=r"early xxs \(1 rows\).*in \[1\]") as e:
        check_batch_split([j.config for j in plan(mixed, fp)])
    assert "early m" not in str(e.value)


def test_missing_inputs_stop_the_cli_naming_the_file_and_the_stage(tiny_data, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", grid={"archs": ["early", "discrete"]})
    args = ["run", "--params", str(params), "--results", str(tmp_path / "results")]
    assert main([*args, "--shards", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "manifest.parquet not found" in err and "dvc repro shards" in err
    assert (
        main([*args, "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "cb.pt")]) == 2
    )
    err = capsys.readouterr().err
    assert "cb.pt not found" in err and "dvc repro codebook" in err
    (tmp_path / "cb.pt").write_bytes(b"codes")
    (tmp_path / "report.json").write_text(json.dumps({"shards_manifest_sha256": "older"}))
    assert (
        main([*args, "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "cb.pt")]) == 2
    )
    err = capsys.readouterr().err
    assert "made from another manifest.parquet" in err and "dvc repro codebook" in err
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- end to end


def expected_kernels() -> str:
    """What a point's record says of its CPU kernels when the grid started it here."""
    if devices._cpu_capability() in ("AVX2", "AVX512"):  # x86 with AVX2: pinned
        return "AVX2 (MKL_CBWR=AVX2, ONEDNN_MAX_CPU_ISA=AVX2)"
    return f"{devices._cpu_capability()} (MKL_CBWR=native, ONEDNN_MAX_CPU_ISA=native)"


def test_points_run_the_avx2_kernels_on_any_x86_cpu_unless_the_user_chose(monkeypatch, tmp_path):
    """An AVX-512 machine's points get the AVX2 code paths (the ones an AVX2 machine runs); a
    variable the user set is kept; a CPU without AVX2 gets none."""
    for name in devices.CPU_KERNELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices, "_cpu_capability", lambda: "AVX512")
    assert devices.cpu_kernel_env() == devices.CPU_KERNELS
    assert devices.cpu_kernel_env({"MKL_CBWR": "COMPATIBLE"}) == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    params = validate_params(grid_params(train={"device": "cpu"}))
    launch = Launch(params, tmp_path, tmp_path, None, tmp_path, None, "rev", None)  # type: ignore[arg-type]
    env = launch.env(None)
    assert {k: env[k] for k in devices.CPU_KERNELS} == devices.CPU_KERNELS
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")  # the user's choice wins
    assert launch.env(None)["ATEN_CPU_CAPABILITY"] == "avx512"
    for other in ("DEFAULT", "SVE256", "NO AVX"):  # ARM, x86 without AVX2
        monkeypatch.setattr(devices, "_cpu_capability", lambda other=other: other)
        assert devices.cpu_kernel_env({}) == {}


@pytest.fixture(scope="module")
def reference(prefect_server, tiny_data, tmp_path_factory, mlflow_uri):
    """The 4-point tiny grid, trained once without interruption."""
    root = tmp_path_factory.mktemp("reference")
    params = write_params(root / "params.yaml")
    t0 = time.perf_counter()
    summary = run_grid(params, tiny_data, root / "results", mlflow_uri)
    summary["seconds"] = time.perf_counter() - t0
    table = by_id(root / "results" / "runs.parquet")
    return {"root": root, "params": params, "summary": summary, "table": table}


@pytest.mark.slow
def test_grid_trains_every_point_and_records_it(reference, mlflow_uri):
    s, table = reference["summary"], reference["table"]
    assert (s["points"], s["trained"], s["ok"], s["failed"]) == (4, 4, 4, 0)
    assert len(table) == 4 and all(r["status"] == "ok" for r in table.values())
    assert {(r["arch"], r["tokens_budget"]) for r in table.values()} == {
        (a, t) for a in ("early", "late") for t in (2048, 4096)
    }
    for r in table.values():
        assert r["D"] >= r["tokens_budget"] and r["N"] > 0 and r["C"] > 0 and r["loss_avg"] > 0
        rec = records.read_record(reference["root"] / "results", r["point_id"])
        assert rec["mlflow_run_id"] == r["mlflow_run_id"]
        assert r["cpu_kernels"] == expected_kernels()  # (ATen's own answer, in the point)
    launches, points = mlflow_runs(mlflow_uri, "ci")
    assert len(launches) == 1 and launches[0].data.metrics["launch/trained"] == 4
    assert len(points) == 4
    for run in points:
        row = table[run.data.tags["point_id"]]
        assert run.info.run_id == row["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["nmm.launch"] == launches[0].info.run_id
        for tag in ("arch", "moe", "size", "tokens", "mixture", "group_id", "status"):
            assert tag in run.data.tags
        assert run.data.params["schedule.batch_rows"] == "4"
        assert run.data.params["schedule.steps"] == str(row["steps"])
        assert run.data.params["counts.N"] == str(row["N"])
        assert run.data.params["record.cpu_kernels"] == row["cpu_kernels"]
        m = run.data.metrics
        assert m["final/loss_avg"] == row["loss_avg"]
        for key in ("train_loss", "lr", "val_avg", "val_text", "tokens_per_s", "mfu"):
            assert key in m
        assert "system/peak_rss_megabytes" in m and "system/cpu_seconds" in m
        curve = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train_loss")
        assert [x.step for x in curve] == list(range(1, row["steps"] + 1))


@pytest.mark.slow
def test_a_grid_of_two_process_points_runs_them_under_torchrun(reference, tiny_data, tmp_path):
    params = write_params(tmp_path / "params.yaml", grid={"archs": ["early"]},
                          train={"processes": 2})  # fmt: skip
    s = run_grid(params, tiny_data, tmp_path / "results", f"sqlite:///{tmp_path}/m.db")
    assert (s["trained"], s["ok"]) == (2, 2)
    table = by_id(tmp_path / "results" / "runs.parquet")
    for pid, row in table.items():  # the same points (processes is not in the id) ...
        assert row["processes"] == 2 and row["cpu_kernels"] == expected_kernels()
        one = reference["table"][pid]
        for k in ("loss_avg", "loss_caption", "loss_text"):  # ... the same model, to rounding
            assert row[k] == pytest.approx(one[k], rel=5e-3), k


@pytest.mark.slow
def test_rerun_trains_nothing_and_a_new_size_trains_only_its_points(
    reference, tiny_data, mlflow_uri
):
    root = reference["root"]
    results = root / "results"
    stamps = {p: p.stat().st_mtime_ns for p in (results / "points").glob("*/*")}
    again = run_grid(reference["params"], tiny_data, results, mlflow_uri)
    assert (again["trained"], again["skipped"], again["ok"]) == (0, 4, 4)
    assert {p: p.stat().st_mtime_ns for p in (results / "points").glob("*/*")} == stamps
    assert len(mlflow_runs(mlflow_uri, "ci")[1]) == 4

    bigger = write_params(root / "bigger.yaml", grid={"sizes": ["xxs", "xs"]})
    grown = run_grid(bigger, tiny_data, results, mlflow_uri)
    assert (grown["trained"], grown["skipped"], grown["ok"]) == (4, 4, 8)
    table = by_id(results / "runs.parquet")
    assert len(table) == 8 and {r["size"] for r in table.values()} == {"xxs", "xs"}
    for pid, row in reference["table"].items():
        assert table[pid]["loss_avg"] == row["loss_avg"]
    assert all(stamps[p] == p.stat().st_mtime_ns for p in stamps)  # xxs records untouched
    launches, points = mlflow_runs(mlflow_uri, "ci")
    assert len(launches) == 3 and len(points) == 8
    assert len({r.data.tags["point_id"] for r in points}) == 8


@pytest.mark.slow
def test_a_nan_point_is_recorded_failed_and_the_others_finish(
    prefect_server, tiny_data, tmp_path, mlflow_uri, monkeypatch
):
    raw = grid_params(grid={"study": "nan", "tokens": [2048]})
    params = write_params(tmp_path / "params.yaml", grid=raw["grid"])
    [late] = ids(raw, tiny_data, arch="late")
    monkeypatch.setenv(FAULT_ENV, json.dumps({late: 3}))  # reaches the point processes
    summary = run_grid(params, tiny_data, tmp_path / "results", mlflow_uri)
    assert (summary["trained"], summary["ok"], summary["failed"]) == (2, 1, 1)
    table = by_id(tmp_path / "results" / "runs.parquet")
    assert table[late]["status"] == "failed" and "non-finite" in table[late]["error"]
    [early] = [r for pid, r in table.items() if pid != late]
    assert early["status"] == "ok" and early["error"] is None
    log = (tmp_path / "results" / "points" / late / "train.log").read_text()
    assert log.count("=== ") == 1  # a NaN is a result, not a crash: not retried
    _, points = mlflow_runs(mlflow_uri, "nan")
    [run] = [r for r in points if r.data.tags["point_id"] == late]
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert "non-finite" in run.data.tags["error"]


def test_a_retry_after_the_point_ended_takes_its_record_and_starts_no_process(
    prefect_server, tiny_data, tmp_path, mlflow_uri, monkeypatch
):
    """Prefect retries a task that raised anywhere, also after its point ended (its API did
    not take the task's end, say): the retry takes the record, starts no process, and the
    point's one run ends."""
    ended: list[str] = []
    train_process = tasks.train_process

    def ends_then_fails(job, launch, gpu):
        out = train_process(job, launch, gpu)
        ended.append(job.point_id)
        if len(ended) == 1:
            raise RuntimeError("the task's end was not taken")
        return out

    monkeypatch.setattr(tasks, "train_process", ends_then_fails)
    study = "retry-ended"
    params = write_params(tmp_path / "params.yaml", grid={
        "study": study, "archs": ["early"], "tokens": [2048], "retries": 1})  # fmt: skip
    summary = run_grid(params, tiny_data, tmp_path / "results", mlflow_uri)
    assert (summary["trained"], summary["ok"], summary["failed"]) == (1, 1, 0)
    [pid] = ended  # one process: the retry started none
    log = records.point_dir(tmp_path / "results", pid) / "train.log"
    assert log.read_text().count("=== ") == 1
    _, [run] = mlflow_runs(mlflow_uri, study)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.info.run_id == by_id(tmp_path / "results" / "runs.parquet")[pid]["mlflow_run_id"]


def _kill_training_when(
    folder: Path, pattern: str, killed: list[str], timeout: float = 120
) -> threading.Thread:
    """SIGKILL this process's training children as soon as a file in ``folder`` matches
    ``pattern``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not list(folder.glob(pattern)):
            time.sleep(0.002)
        for p in psutil.Process().children(recursive=True):
            try:
                # a point process: forked and named nmm-point (flows/supervise.py), or
                # ``python -m flows.train`` (not the fork server, whose preload names it)
                cmd = " ".join(p.cmdline())
                if p.name() == "nmm-point" or ("-m flows.train" in cmd and "forkserver" not in cmd):
                    name = p.name()
                    p.kill()
                    killed.append(name)
            except psutil.Error:
                pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1], ids=["rerun", "retry"])
def test_kill9_mid_point_resumes_to_the_uninterrupted_result_with_one_run(
    reference, tiny_data, tmp_path, mlflow_uri, retries
):
    """retries=0: the killed point is recorded failed, the next launch resumes it;
    retries=1: Prefect retries it in the same launch, from its checkpoint."""
    study = f"kill-{retries}"
    # the early group only (same point ids as the reference)
    raw = grid_params(grid={"study": study, "archs": ["early"], "retries": retries})
    params = write_params(tmp_path / "params.yaml", grid=raw["grid"])
    [target] = ids(raw, tiny_data, arch="early", tokens=4096)
    results = tmp_path / "results"
    killed: list[str] = []
    watcher = _kill_training_when(results / "points" / target, "latest@*.pt", killed)
    first = run_grid(params, tiny_data, results, mlflow_uri)
    watcher.join()
    assert killed, "the point finished before it could be killed"
    if sys.platform == "linux":  # forked from the preloaded server, not a fresh interpreter
        assert killed == ["nmm-point"]
    log = (results / "points" / target / "train.log").read_text()
    if retries == 0:
        assert (first["ok"], first["failed"]) == (1, 1)
        row = by_id(results / "runs.parquet")[target]
        assert row["status"] == "failed" and "SIGKILL" in row["error"]
        assert list((results / "points" / target).glob("latest@*.pt"))  # its checkpoint survived
        assert log.count("=== ") == 1
        second = run_grid(params, tiny_data, results, mlflow_uri)
        assert (second["trained"], second["skipped"], second["ok"]) == (1, 1, 2)
        last = second
    else:
        assert (first["trained"], first["ok"], first["failed"]) == (2, 2, 0)
        assert log.count("=== ") == 2  # one retry
        last = first
    table = by_id(results / "runs.parquet")
    for pid, row in table.items():
        want = reference["table"][pid]
        assert {k: row[k] for k in LOSSES} == {k: want[k] for k in LOSSES}
    launches, points = mlflow_runs(mlflow_uri, study)
    assert len(launches) == (2 if retries == 0 else 1)
    assert sorted(r.data.tags["point_id"] for r in points) == sorted(table)  # one run per point
    [run] = [r for r in points if r.data.tags["point_id"] == target]
    assert run.info.run_id == table[target]["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["status"] == "ok" and "error" not in run.data.tags
    assert run.data.tags["nmm.launch"] == last["parent_run_id"]
    curve = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [x.step for x in curve] == list(range(1, table[target]["steps"] + 1))


@pytest.mark.slow
def test_collect_rebuilds_the_table_from_mlflow_alone_and_only_for_this_code(
    reference, tiny_data, mlflow_uri, tmp_path
):
    """What a machine that trained none of the points does (flows/collect.py)."""
    params = load_params(reference["params"])
    jobs = plan(params, fingerprints(tiny_data.shards, None))
    got = collect(jobs, "ci", mlflow_uri, tmp_path / "runs.parquet")
    assert not got.missing and len(got.rows) == 4
    table = by_id(tmp_path / "runs.parquet")
    assert list(table) == [j.point_id for j in jobs]  # grid order
    for pid, row in table.items():
        want = reference["table"][pid]
        assert {k: row[k] for k in (*LOSSES, "mlflow_run_id")} == {
            k: want[k] for k in (*LOSSES, "mlflow_run_id")
        }
    # another recipe (or code, or data) plans other ids: nothing of this store is current
    other = validate_params(grid_params(train={"weight_decay": 2e-4}))
    stale = collect(plan(other, fingerprints(tiny_data.shards, None)), "ci", mlflow_uri)
    assert stale.rows == [] and len(stale.missing) == 4


def test_collect_refuses_a_run_whose_record_is_another_points(tiny_data, tmp_path):
    """A store where a run tagged with a planned id carries another point's record is
    inconsistent: an error naming the run, no table written; unplanned runs are missing."""
    params = validate_params(grid_params())
    jobs = plan(params, fingerprints(tiny_data.shards, None))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("ci", uri)
    run_id = tracker.start_point("x", jobs[0].point_id, {"arch": "early"}, {})
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"point_id": "someone-else", "code_fingerprint": jobs[0].code}))
    tracker.client.log_artifact(run_id, str(record))
    tracker.client.set_terminated(run_id, "FINISHED")
    out = tmp_path / "runs.parquet"
    with pytest.raises(ValueError, match=f"run {run_id} is tagged point {jobs[0].point_id}"):
        collect(jobs, "ci", uri, out)
    assert not out.exists()
    got = collect(jobs[1:], "ci", uri, out)  # the others have no run: missing, not invented
    assert got.rows == [] and len(got.missing) == len(jobs) - 1


@pytest.mark.slow
def test_a_chain_resubmitted_on_another_machine_skips_points_finished_in_mlflow(
    reference, tiny_data, mlflow_uri, tmp_path
):
    """A pool worker on a machine whose results folder is empty (the chain ran before
    elsewhere): every point whose run in the shared MLflow store is finished is skipped, none
    is trained again, and no run is added."""
    from flows.pool.worker import train_chain

    params = load_params(reference["params"])
    pids = list(reference["table"])
    before = len(mlflow_runs(mlflow_uri, "ci")[1])
    out = train_chain("again", pids, params.model_dump(mode="json"), shards=str(tiny_data.shards),
                      codebook=str(tmp_path / "none.pt"), results=str(tmp_path / "elsewhere"),
                      tracking_uri=mlflow_uri)  # fmt: skip
    assert out["points"] == out["ok"] == len(pids) == 4
    assert not list((tmp_path / "elsewhere").glob("points/*/train.log"))  # nothing trained
    assert len(mlflow_runs(mlflow_uri, "ci")[1]) == before


def test_a_kept_mlflow_call_failing_for_another_reason_spares_the_other_points(tmp_path):
    """flows/tracking.py: a kept call that fails otherwise than unreachable (its run was
    deleted) is dropped, not raised at every later point; a run whose status tag says ok but
    which never ended (its finish cut off) still needs its finish."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("kept", uri)
    tracker.start_point("a", "pidA", {}, {})
    tracker.client.delete_run(tracker.run_id("pidA"))
    tracker.kept["pidA"] = {"finish": ({"status": "ok", "steps": 1}, tmp_path / "m.jsonl", [], {})}
    assert tracker.start_point("b", "pidB", {}, {}) is not None
    assert "pidA" not in tracker.kept and tracker.waiting() == []
    run_b = tracker.run_id("pidB")
    tracker.client.set_tag(run_b, "status", "ok")  # the tag came, the end did not
    assert Tracker("kept", uri).needs_finish("pidB")
