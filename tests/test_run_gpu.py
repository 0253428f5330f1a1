"""benchmarks/run_gpu.sh, the script every GPU call runs: its N-GPU phases launch the commands they document,
on the cards they name, with the remat policy of each recipe. A fake `python3` and `nvidia-smi` on PATH record
the calls, so nothing runs and no GPU is needed."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, phases, **env):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in ("python3", "nvidia-smi"):
    (bin_dir / name).write_text('#!/bin/bash\necho "CALL[$CUDA_VISIBLE_DEVICES] $*" >> "$CALLS"\n')
    (bin_dir / name).chmod(0o755)
  calls = tmp_path / "calls.txt"
  full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
                  RES=str(tmp_path / "res"), CALLS=str(calls), **env)
  out = subprocess.run(["bash", "benchmarks/run_gpu.sh", *phases], cwd=ROOT, env=full_env, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = calls.read_text().splitlines()
  return [l for l in lines if "train_step.py" in l or "multi_gpu_check.py" in l], out.stdout


def test_n_gpu_phases_launch_the_documented_commands(tmp_path):
  calls, log = _run(tmp_path, ["base1:5", "fsdpN:5", "ctxN:5", "checkN:5", "nonsense"], GPUS="4",
                    REMAT="tf_scm=attention_out_only,sf_dmd=full")
  ts = "benchmarks/train_step.py --critic_steps 1 --min_frames 9"
  res = tmp_path / "res"
  # base1: each recipe on its own card, side by side (the log has them in the order they finish)
  assert sorted(calls[:2]) == [
      f"CALL[0] {ts} --out {res}/base1_tf_scm --recipes tf_scm --remat attention_out_only --iters 3",
      f"CALL[1] {ts} --out {res}/base1_sf_dmd --recipes sf_dmd --remat full --iters 3"]
  assert calls[2:] == [
      f"CALL[0,1,2,3] {ts} --out {res}/fsdp4_tf_scm --mesh fsdp=4 --batch 4 --recipes tf_scm --remat "
      "attention_out_only --iters 3",
      f"CALL[0,1,2,3] {ts} --out {res}/fsdp4_sf_dmd --mesh fsdp=4 --batch 4 --recipes sf_dmd --remat full --iters 3",
      f"CALL[0,1,2,3] {ts} --out {res}/ctx4_tf_scm --mesh fsdp=2 context=2 --batch 2 --recipes tf_scm --remat "
      "attention_out_only --iters 3",
      f"CALL[0,1,2,3] {ts} --out {res}/ctx4_sf_dmd --mesh fsdp=2 context=2 --batch 2 --recipes sf_dmd --remat full "
      "--iters 3",
      f"CALL[0,1,2,3] benchmarks/multi_gpu_check.py --out {res}/check4 --gpus 4 --meshes fsdp=4 data=4"]
  assert "unknown phase nonsense" in log and os.path.exists(tmp_path / "out" / "results.tgz")


def test_one_policy_for_all_recipes_and_eight_gpus(tmp_path):
  calls, _ = _run(tmp_path, ["fsdpN:5"], GPUS="8", RECIPES="tf_scm", REMAT="none")
  assert calls == [f"CALL[0,1,2,3,4,5,6,7] benchmarks/train_step.py --critic_steps 1 --min_frames 9 --out "
                   f"{tmp_path / 'res'}/fsdp8_tf_scm --mesh fsdp=8 --batch 8 --recipes tf_scm --remat none --iters 3"]
