"""The torchrun command lines: `python -m engine train --nproc N`, the Slurm script, the Kubernetes Job.

Each produced command is parsed by torchrun's own argument parser (torch.distributed.run), and the
part it hands to the module by our CLI's parser, so a flag torchrun would swallow or refuse fails here.
"""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

from engine import cli
from engine import distributed_launch as L

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
K8S_JOB = ROOT / "deploy" / "k8s-train-job.yaml"
TORCHELASTIC_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def not_under_torchrun(monkeypatch):
    for name in TORCHELASTIC_VARS:
        monkeypatch.delenv(name, raising=False)


def parse_torchrun(cmd_after_module_flag):
    """torchrun's namespace for the arguments after `python -m torch.distributed.run`."""
    return get_args_parser().parse_args(cmd_after_module_flag)


def engine_train_args(torchrun_args):
    assert torchrun_args.module and torchrun_args.training_script == "engine"
    return cli.build_parser().parse_args(torchrun_args.training_script_args)


def test_torchrun_refuses_run_as_an_ambiguous_abbreviation(capsys):
    """The trap this module avoids, measured on torch's own parser."""
    with pytest.raises(SystemExit):
        parse_torchrun(["--standalone", "--nproc-per-node", "2", "-m", "engine", "train", "--run", "x"])
    assert "ambiguous option: --run could match --run-path" in capsys.readouterr().err


def test_every_train_flag_passes_through_torchrun():
    train = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = [s for action in train._actions for s in action.option_strings if s.startswith("--")]
    consumed = {L.RUN_FLAG, *L.LAUNCH_FLAGS, "--help"}
    L.check_passes_through([f for f in flags if f not in consumed])
    for flag in ("--run", "--nproc", "--max-restarts", "--log"):
        with pytest.raises(L.DistributedLaunchError, match=f"flag {flag} cannot pass through torchrun"):
            L.check_passes_through([flag, "x"])


def test_split_launch_args_strips_launcher_flags_and_renames_run():
    args, nproc, restarts = L.split_launch_args(["--config", "c.yaml", "--nproc", "4", "--run=abc",
                                                 "--max-restarts", "2", "--set", "train.epochs=3"])
    assert (args, nproc, restarts) == (["--config", "c.yaml", "--set", "train.epochs=3", "--run-name", "abc"], 4, 2)
    assert L.split_launch_args(["--config", "c.yaml"]) == (["--config", "c.yaml"], 1, 0)
    with pytest.raises(L.DistributedLaunchError, match="--nproc 0: must be >= 1"):
        L.split_launch_args(["--nproc", "0"])
    with pytest.raises(L.DistributedLaunchError, match="--nproc 'two': expected an integer"):
        L.split_launch_args(["--nproc", "two"])


def test_nproc_command_passes_every_flag_to_the_workers():
    cmd = L.train_launch_command(["--config", "configs/demo_cpu.yaml", "--run", "r1", "--data", "d",
                                  "--device", "cpu", "--set", "train.epochs=2", "--runs-dir", "R",
                                  "--nproc", "2", "--max-restarts", "1"], run_name="r1")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    ns = parse_torchrun(cmd[3:])
    assert (ns.standalone, ns.nnodes, ns.nproc_per_node, ns.max_restarts, ns.shutdown_timeout) == \
        (True, "1", "2", 1, L.DEFAULT_SHUTDOWN_TIMEOUT_S)
    train = engine_train_args(ns)
    assert (train.command, train.config, train.run, train.data, train.device, train.runs_dir) == \
        ("train", "configs/demo_cpu.yaml", "r1", "d", "cpu", "R")
    assert train.overrides == ["train.epochs=2"] and (train.nproc, train.max_restarts) == (1, 0)


def test_the_default_run_name_is_fixed_before_launch_and_resume_keeps_its_name():
    cmd = L.train_launch_command(["--config", "c.yaml", "--nproc", "2"], run_name="c-20260101-000000")
    assert engine_train_args(parse_torchrun(cmd[3:])).run == "c-20260101-000000"
    cmd = L.train_launch_command(["--resume", "old", "--nproc", "2"], run_name=None)
    train = engine_train_args(parse_torchrun(cmd[3:]))
    assert (train.resume, train.run) == ("old", None)
    assert L.train_launch_command(["--config", "c.yaml"], run_name="x") is None  # one plain process
    cmd = L.train_launch_command(["--config", "c.yaml", "--max-restarts", "3"], run_name="x")
    assert parse_torchrun(cmd[3:]).nproc_per_node == "1"  # restarts alone also need the agent


def test_nproc_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    with pytest.raises(L.DistributedLaunchError, match="already runs under it"):
        L.train_launch_command(["--config", "c.yaml", "--nproc", "2"], run_name="x")


def test_multi_node_command_uses_a_c10d_rendezvous():
    ns = parse_torchrun(L.torchrun_command(["train", "--config", "c.yaml"], 8, 2, nnodes=2,
                                           rdzv_endpoint="node1:29400", rdzv_id="job7")[3:])
    assert (ns.nnodes, ns.rdzv_backend, ns.rdzv_endpoint, ns.rdzv_id, ns.standalone) == \
        ("2", "c10d", "node1:29400", "job7", False)
    with pytest.raises(L.DistributedLaunchError, match="need a rendezvous endpoint"):
        L.torchrun_command(["train"], 8, nnodes=2)


def test_cli_nproc_execs_torchrun_with_a_fixed_run_name(monkeypatch):
    seen = []

    def fake_exec(cmd):  # stands in for os.execve, which would replace the test process
        seen.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(L, "exec_torchrun", fake_exec)
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--nproc", "2"])
    train = engine_train_args(parse_torchrun(seen[0][3:]))
    assert re.fullmatch(r"demo_cpu-\d{8}-\d{6}", train.run)
    assert cli.main(["train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--nproc", "2",
                     "--set", "train.epochs=0"]) == 2  # a bad config fails before any launch
    assert len(seen) == 1


def test_the_produced_command_really_runs_under_torchrun(tmp_path):
    """torchrun hands every flag to the module unchanged (a stand-in `engine` package writes its argv to a file
    per rank: both ranks printing to the one pipe could interleave their lines)."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__main__.py").write_text(
        "import os, sys\nopen(f\"argv-{os.environ['RANK']}\", 'w').write(f\"ARGV {os.environ['RANK']} {sys.argv[1:]}\")\n")
    cmd = L.train_launch_command(["--config", "c.yaml", "--run", "r1", "--set", "a.b=1", "--nproc", "2"], "r1")
    env = {k: v for k, v in os.environ.items() if k not in TORCHELASTIC_VARS}
    env.update(PYTHONPATH=str(tmp_path), GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [(tmp_path / f"argv-{rank}").read_text() for rank in (0, 1)]
    expected = "['train', '--config', 'c.yaml', '--set', 'a.b=1', '--run-name', 'r1']"
    assert lines == [f"ARGV 0 {expected}", f"ARGV 1 {expected}"]


def test_launch_environment_makes_the_engine_importable():
    env = L.launch_environment({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(L.PROJECT_ROOT), "/x"] and env["PYTHONUNBUFFERED"] == "1"


# ----------------------------------------------------------------------------- cluster files
def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _sbatch_command(tmp_path, **env_extra):
    """Run the batch script with stand-in srun/scontrol; returns the argv srun received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_bin(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    # many names: a reader that closes the pipe early (`| head -n 1`) would kill it with SIGPIPE
    _fake_bin(bin_dir, "scontrol", 'echo gpu-node-07; for i in $(seq 8 5000); do echo gpu-node-$i; done\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_GPUS_ON_NODE": "4", "SHARED": str(tmp_path / "shared"),
           **env_extra}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "srun.args").read_text().splitlines()


def test_slurm_script_runs_one_torchrun_agent_per_node(tmp_path):
    argv = _sbatch_command(tmp_path)
    assert argv[0] == "--kill-on-bad-exit=1" and argv[2:4] == ["-m", "torch.distributed.run"]
    ns = parse_torchrun(argv[4:])
    assert (ns.nnodes, ns.nproc_per_node, ns.rdzv_backend, ns.rdzv_endpoint, ns.rdzv_id, ns.max_restarts) == \
        ("2", "4", "c10d", "gpu-node-07:29400", "4242", 2)
    train = engine_train_args(ns)
    shared = tmp_path / "shared"
    assert (train.config, train.run, train.runs_dir, train.data) == \
        ("configs/train_plate_detector.yaml", "plates-4242", f"{shared}/runs", f"{shared}/data/plates")
    assert train.overrides == [f"run.checkpoints_dir={shared}/checkpoints"]
    # a requeued job (its run folder exists) resumes the same run
    (shared / "runs" / "plates-4242").mkdir(parents=True)
    (shared / "runs" / "plates-4242" / "config.yaml").write_text("{}\n")
    train = engine_train_args(parse_torchrun(_sbatch_command(tmp_path)[4:]))
    assert (train.resume, train.runs_dir, train.config) == ("plates-4242", f"{shared}/runs", None)
    assert not (train.run or train.data or train.overrides)  # the only form cmd_train accepts with --resume


def test_kubernetes_job_runs_one_torchrun_agent_per_pod():
    service, job = list(yaml.safe_load_all(K8S_JOB.read_text()))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]  # kubelet's $(VAR)
    assert container["command"][1:] == ["-m", "torch.distributed.run"]
    ns = parse_torchrun(args)
    assert ns.nnodes == str(spec["completions"]) == str(spec["parallelism"])
    assert ns.nproc_per_node == str(container["resources"]["limits"]["nvidia.com/gpu"])
    host = f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert (ns.rdzv_backend, ns.rdzv_endpoint) == ("c10d", f"{host}:{service['spec']['ports'][0]['port']}")
    assert service["metadata"]["name"] == pod["subdomain"] and service["spec"]["clusterIP"] == "None"
    assert pod["terminationGracePeriodSeconds"] > ns.shutdown_timeout
    train = engine_train_args(ns)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert train.run == env["RUN_NAME"] and "/shared" in mounts
    assert train.runs_dir.startswith("/shared/") and train.overrides == ["run.checkpoints_dir=/shared/checkpoints"]
