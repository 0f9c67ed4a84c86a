"""Distributed training: two CPU processes (gloo) train as one process with their joint batch.

Both trainers are launched as a user would, `torchrun --standalone --nproc_per_node 2`, on 48
tiny mannequins; the one-process references run in-process through main(argv). What holds:
  * 2 processes x batch b take the optimizer steps of 1 process x batch 2b: EpochBatchSampler
    gives rank r the r-th slice of every global batch, DDP averages gradients, and in stage 1
    the discriminator's BatchNorm and the adaptive lambda see the global batch;
  * rank 0 alone writes files and prints, and alone encodes the stage-2 token cache;
  * a two-process run resumes exactly, and refuses to resume with another process count;
  * k micro-batches of b accumulate to one step of k * b;
  * GlobalBatchNorm2d in two processes is BatchNorm2d over the concatenated batch, and
    Distributed.no_sync keeps gradients local until a step's last micro-batch.
"""
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import distributed
import training_transformer
import utils
from discriminator import GlobalBatchNorm2d
from vqgan import VQGAN, VQGANConfig, save_vqgan
from conftest import LPIPS_WEIGHTS, MACHINE_CPU, needs_lpips

# training_vqgan (LPIPS and torchvision behind it take seconds to import) is imported inside the
# stage-1 fixtures: the two gloo processes spawned below import this module, and start faster.

REPO = Path(__file__).resolve().parents[1]
# 39 training images make an epoch of 4 batches of 8, or of 9 micro-batches of 4 with 2 per step
# (the 9th then shares a step with the next epoch's first): runs stay within the first epoch.
STAGE_2_STEPS = 4
STAGE_1_LR = 1e-4


@pytest.fixture(scope="module")
def data(mannequin_set):
    return mannequin_set(48, 32)


def torchrun(script, args, cwd):
    """`script` under torchrun with two processes on the CPU; the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(REPO / script), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(tree, prefix=""):
    """{dotted name: tensor} of every tensor in nested dicts and lists (state dicts, optimizer
    state)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found = {}
    for key, value in items:
        if torch.is_tensor(value):
            found[f"{prefix}{key}"] = value
        elif isinstance(value, (dict, list, tuple)):
            found.update(tensors(value, f"{prefix}{key}."))
    return found


def assert_tensors_close(actual, expected, atol=0.0):
    """Every tensor of two nested structures: integers equal, floats within atol (0: equal)."""
    actual, expected = tensors(actual), tensors(expected)
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        if atol == 0 or not e.is_floating_point():
            same = torch.equal(a, e)
            assert same, f"{name} differs"
        else:
            difference = (a.double() - e.double()).abs().max().item()
            assert difference <= atol, f"{name} differs by {difference:.3g} > {atol:.3g}"


def run_files(run_dir):
    return sorted(str(path.relative_to(run_dir)) for path in Path(run_dir).rglob("*")
                  if path.is_file())


def logged_steps(run_dir, key):
    return [record["step"] for record in utils.read_jsonl(Path(run_dir) / "metrics.jsonl")
            if key in record]


# ----------------------------------------------------------------------------------------------
# GlobalBatchNorm2d and Distributed.no_sync inside a two-process gloo group
# ----------------------------------------------------------------------------------------------


def two_process_worker(rank, folder):
    """One of two gloo processes: runs its half of the checks' inputs, saves what it saw."""
    torch.set_num_threads(1)
    folder = Path(folder)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                                         rank=rank, world_size=2)
    try:
        inputs = torch.load(folder / "inputs.pt", weights_only=True)
        half = slice(rank * 4, rank * 4 + 4)  # rank r holds the r-th half of the batch of 8
        seen = {}
        # float64 throughout; then bf16 activations into a float32 module, as under autocast
        for name, x_dtype, norm_dtype in (("float64", torch.float64, torch.float64),
                                          ("bfloat16", torch.bfloat16, torch.float32)):
            norm = GlobalBatchNorm2d(3).to(norm_dtype)
            norm.load_state_dict(inputs["norm"])
            x = inputs["x"][half].to(x_dtype, copy=True).requires_grad_(True)
            y = norm(x)
            (y.to(inputs["upstream"].dtype) * inputs["upstream"][half]).sum().backward()
            seen[name] = {"y": y.detach(), "x_grad": x.grad, "weight_grad": norm.weight.grad,
                          "bias_grad": norm.bias.grad, "buffers": dict(norm.named_buffers())}

        dist = distributed.Distributed(rank=rank, local_rank=rank, world_size=2)
        linear = nn.Linear(3, 1, bias=False)
        linear.load_state_dict(inputs["linear"])
        ddp = nn.parallel.DistributedDataParallel(linear)
        grads = []
        for micro, last in enumerate((False, True)):
            with dist.no_sync(ddp, last=last):
                ddp(inputs["micro_batches"][micro][half]).sum().backward()
            grads.append(linear.weight.grad.clone())
        seen["no_sync_grads"] = grads
        torch.save(seen, folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_group(tmp_path_factory):
    """Inputs for a batch of 8, and what each of two gloo processes computed from its half."""
    folder = tmp_path_factory.mktemp("gloo")
    generator = torch.Generator().manual_seed(0)
    norm = nn.BatchNorm2d(3)
    nn.init.normal_(norm.weight, 1.0, 0.3, generator=generator)
    nn.init.normal_(norm.bias, 0.0, 0.3, generator=generator)
    inputs = {"x": 2 + 3 * torch.randn(8, 3, 5, 5, generator=generator, dtype=torch.float64),
              "upstream": torch.randn(8, 3, 5, 5, generator=generator, dtype=torch.float64),
              "norm": norm.state_dict(), "linear": nn.Linear(3, 1, bias=False).state_dict(),
              "micro_batches": torch.randn(2, 8, 3, generator=generator)}
    torch.save(inputs, folder / "inputs.pt")
    torch.multiprocessing.spawn(two_process_worker, args=(str(folder),), nprocs=2)
    return inputs, [load(folder / f"rank{rank}.pt") for rank in range(2)]


def batch_norm_reference(inputs, dtype):
    """nn.BatchNorm2d in one process over the whole batch of 8."""
    norm = nn.BatchNorm2d(3).to(dtype)
    norm.load_state_dict(inputs["norm"])
    x = inputs["x"].to(dtype, copy=True).requires_grad_(True)
    y = norm(x)
    (y.to(inputs["upstream"].dtype) * inputs["upstream"]).sum().backward()
    return y.detach(), x.grad, norm


def test_global_batch_norm_in_two_processes_equals_batch_norm_over_the_joint_batch(
        two_process_group):
    inputs, ranks = two_process_group
    y, x_grad, reference = batch_norm_reference(inputs, torch.float64)
    seen = [rank["float64"] for rank in ranks]
    close = dict(atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([s["y"] for s in seen]), y, **close)
    # each rank's input gradient includes what its values did to the other rank's outputs
    torch.testing.assert_close(torch.cat([s["x_grad"] for s in seen]), x_grad, **close)
    # parameter gradients are per rank until DDP all-reduces them: their sum is the whole one
    torch.testing.assert_close(seen[0]["weight_grad"] + seen[1]["weight_grad"],
                               reference.weight.grad, **close)
    torch.testing.assert_close(seen[0]["bias_grad"] + seen[1]["bias_grad"],
                               reference.bias.grad, **close)
    for rank in seen:  # running mean, unbiased running variance, batches tracked
        torch.testing.assert_close(rank["buffers"], dict(reference.named_buffers()), **close)


def test_global_batch_norm_keeps_float32_statistics_for_bf16_activations_as_under_autocast(
        two_process_group):
    """Under CUDA autocast the discriminator's convs hand bf16 to its BatchNorm: the sums are
    taken in float32 (and the float32 running statistics updated), the output stays bf16."""
    inputs, ranks = two_process_group
    # the reference: float32 BatchNorm2d over the same bf16-rounded values
    y, _, reference = batch_norm_reference({**inputs, "x": inputs["x"].bfloat16().float()},
                                           torch.float32)
    seen = [rank["bfloat16"] for rank in ranks]
    assert all(rank["y"].dtype == torch.bfloat16 for rank in seen)
    torch.testing.assert_close(torch.cat([s["y"] for s in seen]), y.bfloat16())
    for rank in seen:
        torch.testing.assert_close(rank["buffers"], dict(reference.named_buffers()))


def test_no_sync_keeps_gradients_local_until_the_last_micro_batch_then_averages_them(
        two_process_group):
    inputs, ranks = two_process_group
    micro = inputs["micro_batches"]  # (2 micro-batches, 8, 3); rank r holds rows 4r .. 4r+3

    def local_grad(m, rank):  # d/dW of sum(x W^T) over rank's rows of micro-batch m
        return micro[m, 4 * rank:4 * rank + 4].sum(0, keepdim=True)
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["no_sync_grads"][0], local_grad(0, rank))
    accumulated = [local_grad(0, r) + local_grad(1, r) for r in range(2)]
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["no_sync_grads"][1],
                                   (accumulated[0] + accumulated[1]) / 2)


# ----------------------------------------------------------------------------------------------
# Stage 2: the transformer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqgan_path(tmp_path_factory):
    """An untrained tiny VQGAN: stage 2 needs some frozen tokenizer, not a good one."""
    torch.manual_seed(0)
    config = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=32, embed_dim=16, n_embed=32, resolution=32)
    path = tmp_path_factory.mktemp("vqgan") / "vqgan.pt"
    save_vqgan(VQGAN(config), str(path))
    return path


@contextlib.contextmanager
def seeing_this_machines_cpu():
    """In-process runs that take a torchrun's token cache see this machine's CPU, as torchrun's
    processes do (conftest shows the tests a CPU without AMX): the cache key holds the automatic
    precision the tokens were encoded in, bf16 with AMX."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "get_capabilities", lambda: MACHINE_CPU)
        yield


def stage_2_args(data, vqgan_path, run_dir, *extra):
    """A one-layer GPT on keypoint-conditioned tokens, flips on; `extra` overrides.

    No gradient clipping: it would hide a wrongly scaled gradient from the optimizer state.
    float32 on any CPU (auto would be bf16 with AMX): the runs are compared at 1e-5. No
    condition dropout: its masks repeat across ranks (README, Multi-GPU), so two processes of
    batch 4 drop other sequences than one of batch 8.
    """
    return ["--dataset-path", data, "--vqgan-checkpoint", vqgan_path, "--image-size", "32",
            "--val-fraction", "0.2", "--run-dir", run_dir, "--device", "cpu",
            "--precision", "fp32", "--num-workers", "0", "--n-layer", "1", "--n-head", "2",
            "--condition-dropout", "0",
            "--n-embd", "32",
            "--lr", "1e-3", "--warmup-steps", "1", "--grad-clip", "1e9", "--grid-examples", "1",
            "--max-steps", STAGE_2_STEPS, "--log-every", "2", "--save-every", "2",
            "--sample-every", "2", *extra]


def with_token_cache_of(run_dir, new_run_dir):
    """A new run folder holding `run_dir`'s token cache, so that it skips the encoding."""
    shutil.copytree(Path(run_dir) / "token_cache", Path(new_run_dir) / "token_cache")
    return new_run_dir


@pytest.fixture(scope="module")
def stage_2_two_processes(data, vqgan_path, tmp_path_factory):
    """A fresh run of 2 processes x batch 4: its folder and the finished torchrun."""
    run_dir = tmp_path_factory.mktemp("stage2_two")
    result = torchrun("training_transformer.py",
                      stage_2_args(data, vqgan_path, run_dir, "--batch-size", 4), run_dir)
    return run_dir, result


@pytest.fixture(scope="module")
def stage_2_one_process(data, vqgan_path, stage_2_two_processes, tmp_path_factory):
    """The same run as 1 process x batch 8, on the two-process run's token cache."""
    run_dir = with_token_cache_of(stage_2_two_processes[0], tmp_path_factory.mktemp("stage2_one"))
    with seeing_this_machines_cpu():
        training_transformer.main([*map(str, stage_2_args(data, vqgan_path, run_dir)),
                                   "--batch-size", "8"])
    return run_dir


def test_stage_2_two_processes_of_batch_4_train_like_one_process_of_batch_8(
        stage_2_two_processes, stage_2_one_process):
    two = load(stage_2_two_processes[0] / "transformer_last.pt")
    one = load(stage_2_one_process / "transformer_last.pt")
    assert two["step"] == one["step"] == STAGE_2_STEPS
    assert_tensors_close(two["model"], one["model"], atol=1e-5)
    assert_tensors_close(two["optimizer"]["state"], one["optimizer"]["state"], atol=1e-5)


def test_stage_2_gradient_accumulation_of_2_x_4_equals_one_batch_of_8(
        data, vqgan_path, stage_2_one_process, tmp_path):
    run_dir = with_token_cache_of(stage_2_one_process, tmp_path / "run")
    with seeing_this_machines_cpu():
        training_transformer.main([*map(str, stage_2_args(data, vqgan_path, run_dir)),
                                   "--batch-size", "4", "--grad-accum", "2"])
    accumulated = load(run_dir / "transformer_last.pt")
    one = load(stage_2_one_process / "transformer_last.pt")
    assert_tensors_close(accumulated["model"], one["model"], atol=1e-5)
    assert_tensors_close(accumulated["optimizer"]["state"], one["optimizer"]["state"],
                         atol=1e-5)


def test_stage_2_two_process_run_resumed_midway_equals_the_uninterrupted_one(
        data, vqgan_path, stage_2_two_processes, tmp_path):
    """Stopped at step 2 (mid-epoch) and resumed, both under torchrun: every rank loads the
    same checkpoint and finds its place in the data."""
    uninterrupted_dir = stage_2_two_processes[0]
    run_dir = with_token_cache_of(uninterrupted_dir, tmp_path / "run")
    args = stage_2_args(data, vqgan_path, run_dir, "--batch-size", 4)
    torchrun("training_transformer.py", [*args, "--max-steps", 2], tmp_path)
    torchrun("training_transformer.py", [*args, "--resume"], tmp_path)
    resumed = load(run_dir / "transformer_last.pt")
    uninterrupted = load(uninterrupted_dir / "transformer_last.pt")
    assert resumed["step"] == STAGE_2_STEPS
    assert_tensors_close(resumed["model"], uninterrupted["model"])
    assert_tensors_close(resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"])


def test_resuming_a_two_process_run_in_one_process_is_refused(
        data, vqgan_path, stage_2_two_processes, tmp_path):
    """Rank slices, global batch and default lr depend on the process count: not exact."""
    checkpoint = stage_2_two_processes[0] / "transformer_last.pt"
    run_dir = with_token_cache_of(stage_2_two_processes[0], tmp_path / "run")
    with pytest.raises(utils.UserError, match=r"trained by 2 process\(es\), this run has 1"):
        training_transformer.main([*map(str, stage_2_args(data, vqgan_path, run_dir)),
                                   "--batch-size", "4", "--max-steps", "8",
                                   "--resume", str(checkpoint)])


def test_only_rank_0_writes_the_stage_2_outputs_and_prints(stage_2_two_processes):
    run_dir, result = stage_2_two_processes
    (cache,) = os.listdir(run_dir / "token_cache")
    assert run_files(run_dir) == [
        "loss_curves.png", "metrics.jsonl", "samples/samples_000002.png",
        "samples/samples_000004.png", f"token_cache/{cache}", "transformer_last.pt"]
    assert logged_steps(run_dir, "loss") == [2, 4]  # each step once: no rank-1 copies
    assert logged_steps(run_dir, "val_bits_per_token") == [4]
    headers, footers = (result.stdout.count(line) for line in
                        ("stage 2: keypoints conditioning", "stage 2 outputs in"))
    assert headers == footers == 1


def test_rank_0_alone_encodes_the_stage_2_token_cache_and_rank_1_reads_it(
        stage_2_two_processes):
    run_dir, result = stage_2_two_processes
    assert len(os.listdir(run_dir / "token_cache")) == 1
    # each encoding draws one progress bar (rank 1 would draw its own if it encoded too)
    encodings = result.stderr.count("encoding train split:   0%")
    assert encodings == 1


# ----------------------------------------------------------------------------------------------
# Stage 1: the VQGAN and its discriminator
# ----------------------------------------------------------------------------------------------


def stage_1_args(data, run_dir, *extra):
    """A tiny VQGAN with the GAN on from step 0 and no dead-code restarts; `extra` overrides.

    --val-fraction 0.2 leaves 39 training images; float32 on any CPU, as stage_2_args.
    """
    return ["--dataset-path", data, "--image-size", "32", "--val-fraction", "0.2",
            "--run-dir", run_dir, "--device", "cpu", "--precision", "fp32", "--num-workers", "0",
            "--no-flip",
            "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "",
            "--z-channels", "32", "--embed-dim", "32", "--n-embed", "32",
            "--no-restart-dead-codes", "--lr", STAGE_1_LR, "--disc-start", "0",
            "--max-steps", "1", "--log-every", "1", "--save-every", "1", "--sample-every", "1",
            "--lpips-weights", LPIPS_WEIGHTS, *extra]


@pytest.fixture(scope="module")
def stage_1_two_processes(data, tmp_path_factory):
    """One GAN step of 2 processes x batch 2: the run folder and the finished torchrun."""
    if not LPIPS_WEIGHTS.is_file():
        pytest.skip(f"LPIPS backbone weights missing: {LPIPS_WEIGHTS}")
    run_dir = tmp_path_factory.mktemp("stage1_two")
    result = torchrun("training_vqgan.py", stage_1_args(data, run_dir, "--batch-size", 2),
                      run_dir)
    return run_dir, result


@pytest.fixture(scope="module")
def stage_1_one_process(data, tmp_path_factory):
    """The same step as 1 process x batch 4 (building its own LPIPS, which draws from the RNG
    before the VQGAN is initialised, as in the torchrun processes)."""
    if not LPIPS_WEIGHTS.is_file():
        pytest.skip(f"LPIPS backbone weights missing: {LPIPS_WEIGHTS}")
    import training_vqgan
    run_dir = tmp_path_factory.mktemp("stage1_one")
    training_vqgan.main([*map(str, stage_1_args(data, run_dir)), "--batch-size", "4"])
    return run_dir


@needs_lpips
def test_stage_1_two_processes_of_batch_2_take_the_gan_step_of_one_process_of_batch_4(
        stage_1_two_processes, stage_1_one_process):
    """GlobalBatchNorm2d and the all-reduced adaptive lambda make the generator's and the
    discriminator's gradients those of the joint batch: Adam's moments (which hold them) and
    D's BatchNorm statistics agree to float precision.

    The weights agree to 2 * lr: Adam's first step moves a weight by lr * g / (|g| + eps), so a
    weight whose gradient is float noise in both runs (a bias before GroupNorm) may step either
    way. Hence one step: later gradients are taken at weights that differ by such steps. With
    dead-code restarts on, the runs legitimately differ: under DDP the new codes come from rank
    0's half of the batch, so this step runs with --no-restart-dead-codes.
    """
    two = load(stage_1_two_processes[0] / "vqgan_last.pt")
    one = load(stage_1_one_process / "vqgan_last.pt")
    for optimizer in ("opt_g", "opt_d"):
        assert_tensors_close(two[optimizer]["state"], one[optimizer]["state"], atol=1e-5)
    statistics = {name: value for name, value in one["discriminator"].items()
                  if "running" in name or "num_batches" in name}
    assert len(statistics) == 9  # three BatchNorm layers
    assert_tensors_close({name: two["discriminator"][name] for name in statistics}, statistics,
                         atol=1e-5)
    assert_tensors_close(two["model"], one["model"], atol=2 * STAGE_1_LR)
    assert_tensors_close(two["discriminator"], one["discriminator"], atol=2 * STAGE_1_LR)


@needs_lpips
def test_stage_1_two_processes_log_the_metrics_of_one_process(stage_1_two_processes,
                                                              stage_1_one_process):
    """Losses, lambda and codebook usage are of the global batch, not of rank 0's half."""
    two = utils.read_jsonl(stage_1_two_processes[0] / "metrics.jsonl")
    one = utils.read_jsonl(stage_1_one_process / "metrics.jsonl")
    assert [record.keys() for record in two] == [record.keys() for record in one]
    for logged, expected in zip(two, one):
        for key in expected.keys() - {"images_per_s"}:
            assert logged[key] == pytest.approx(expected[key], rel=1e-4), key


@needs_lpips
def test_only_rank_0_writes_the_stage_1_outputs_and_prints(stage_1_two_processes):
    run_dir, result = stage_1_two_processes
    assert run_files(run_dir) == ["loss_curves.png", "metrics.jsonl",
                                  "samples/reconstructions_000001.png", "vqgan.pt",
                                  "vqgan_last.pt"]
    assert logged_steps(run_dir, "rec_loss") == [1]
    assert logged_steps(run_dir, "val_l1") == [1]
    footers = result.stdout.count("stage 1 outputs in")
    assert footers == 1


@needs_lpips
def test_stage_1_gradient_accumulation_of_2_x_2_equals_one_batch_of_4_with_the_gan_off(
        data, tmp_path, monkeypatch):
    """Only with the GAN off: with it on, lambda and D's BatchNorm statistics are per
    micro-batch, so accumulation legitimately differs from one large batch."""
    import training_vqgan
    lpips = training_vqgan.LPIPSLoss(weights_path=str(LPIPS_WEIGHTS))
    monkeypatch.setattr(training_vqgan, "LPIPSLoss", lambda weights_path=None: lpips)
    runs = {}
    for name, batch in (("accumulated", ["--batch-size", "2", "--grad-accum", "2"]),
                        ("one", ["--batch-size", "4"])):
        runs[name] = tmp_path / name
        training_vqgan.main([*map(str, stage_1_args(data, runs[name])), "--disc-start", "10",
                             *batch])
    accumulated, one = (load(runs[name] / "vqgan_last.pt") for name in ("accumulated", "one"))
    assert_tensors_close(accumulated["opt_g"]["state"], one["opt_g"]["state"], atol=1e-5)
    assert_tensors_close(accumulated["model"], one["model"], atol=2 * STAGE_1_LR)
