from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.fill import extract
from embedder.errors import FinetuneError, SourceError
from embedder.learn.finetune.options import FinetuneOptions
from embedder.learn.finetune.schedule import param_groups
from embedder.learn.finetune.train import build_model, finetune
from embedder.models import checkpoint
from embedder.models.builder import ModelSpec
from embedder.models.registry import get_backbone
from embedder.store.shards import Store
from tests.conftest import make_images

runner = CliRunner()
TINY = FinetuneOptions(backbone="tiny_test", batch_size=8, workers=0, lr_head=0.05, lr_backbone=0.01)


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    make_images(root, {"red": 16, "green": 16, "blue": 16}, seed=0)
    return root


def test_training_lowers_the_loss(labelled: Path, tmp_path: Path) -> None:
    opts = FinetuneOptions(**{**TINY.__dict__, "epochs": 4, "head_epochs": 1, "probe_init": False})
    r = finetune([str(labelled)], tmp_path / "ck.safetensors", opts)
    losses = [h.train_loss for h in r.history]
    assert r.epochs_run == 4 and losses[-1] < losses[0]
    vals = [h.val_accuracy for h in r.history]
    # three mean colours: the frozen probe on the same split separates them (chance is 1/3)
    assert r.frozen_val_accuracy >= 0.9, r.frozen_val_accuracy
    assert r.best_epoch == int(np.argmax(vals)) + 1 and r.best_val_accuracy == vals[r.best_epoch - 1]
    _, meta = checkpoint.load(tmp_path / "ck.safetensors")  # the file holds the best epoch, not the last
    assert meta["best_epoch"] == r.best_epoch and meta["best_val_accuracy"] == r.best_val_accuracy
    assert [h.phase for h in r.history] == ["head", "full", "full", "full"]


def test_head_only_phase_leaves_the_backbone_untouched(labelled: Path, tmp_path: Path) -> None:
    before = get_backbone("tiny_test").build_architecture().state_dict()
    opts = FinetuneOptions(**{**TINY.__dict__, "epochs": 2, "freeze_backbone": True})
    finetune([str(labelled)], tmp_path / "ck.safetensors", opts)
    after, meta = checkpoint.load(tmp_path / "ck.safetensors")
    for k, v in before.items():
        if k.startswith("fc."):
            continue
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)  # BN running stats included
    assert after["fc.weight"].shape == (3, 32)
    assert not torch.equal(after["fc.bias"], torch.zeros(3))
    assert meta["classes"] == ["blue", "green", "red"] and "frozen" in meta["bn_policy"]


def test_per_group_learning_rates(tmp_path: Path) -> None:
    opts = FinetuneOptions(backbone="tiny_test", lr_head=1e-2, lr_backbone=1e-4, lr_decay=0.5)
    net, backbone, _, _ = build_model(opts, 3)
    groups = {g["name"]: g["lr"] for g in param_groups(net, backbone, opts)}
    assert groups == pytest.approx({"head": 1e-2, "stage2": 1e-4, "stage1": 5e-5, "stem": 2.5e-5})
    part = FinetuneOptions(**{**opts.__dict__, "unfreeze_from": "stage1"})
    groups = [g["name"] for g in param_groups(net, backbone, part)]
    assert groups == ["head", "stage2", "stage1"]
    with pytest.raises(FinetuneError, match="stages: stem, stage1, stage2"):
        param_groups(net, backbone, FinetuneOptions(**{**opts.__dict__, "unfreeze_from": "layer9"}))


def test_checkpoint_feeds_extract_and_predict(labelled: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck.safetensors"
    finetune([str(labelled)], ck, FinetuneOptions(**{**TINY.__dict__, "epochs": 2}))
    store = str(tmp_path / "store")
    extract([str(labelled)], store, ModelSpec("tiny_test", weights_file=ck))
    prov = Store.open(store).provenance
    assert (prov.weights.kind, prov.weights.name) == ("finetune", "ck.safetensors")
    assert prov.weights.origin is not None and prov.weights.origin["name"] == "tiny_test.SEED0"
    import shutil

    from embedder.models.builder import load_weights_file

    renamed = tmp_path / "my-model.bin"  # recognised by content, whatever the name
    shutil.copy(ck, renamed)
    assert load_weights_file(renamed).info.kind == "finetune"
    r = runner.invoke(app, ["predict", str(ck), str(labelled / "red"), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(rows) == 16 and {row["predicted"] for row in rows} <= {"red", "green", "blue"}
    # predict's own head agrees with running the checkpoint's full network
    state, meta = checkpoint.load(ck)
    net = get_backbone("tiny_test").build_architecture()
    net.fc = torch.nn.Linear(32, 3)
    net.load_state_dict(state)
    net.eval()
    from embedder.decode.decoders import decode_file, normalize_batch
    from embedder.models.preprocessing import Preprocessing

    pre = Preprocessing.from_dict(meta["preprocessing"])
    x = normalize_batch(torch.stack([decode_file(row["path"], pre).pixels for row in rows]), pre)
    with torch.no_grad():
        expected = [meta["classes"][i] for i in net(x).argmax(1)]
    assert [row["predicted"] for row in rows] == expected


def test_bad_input(tmp_path: Path) -> None:
    make_images(tmp_path / "one", {"only": 5})
    with pytest.raises(FinetuneError, match="at least 2 classes"):
        finetune([str(tmp_path / "one")], tmp_path / "c", TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        finetune([str(tmp_path / "empty")], tmp_path / "c", TINY)
    make_images(tmp_path / "flat", {"": 6})
    with pytest.raises(FinetuneError, match="no labels"):
        finetune([str(tmp_path / "flat")], tmp_path / "c", TINY)


def test_broken_images_are_skipped_and_unseen_val_classes_warned(labelled: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    (labelled / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    val = tmp_path / "val"
    make_images(val, {"red": 3, "green": 3, "purple": 2}, seed=4)
    r = finetune([str(labelled)], tmp_path / "ck.safetensors", FinetuneOptions(**{**TINY.__dict__, "epochs": 1}),
                 val_source=[str(val)])
    assert [Path(p).name for p, _ in r.skipped_images] == ["broken.jpg"]
    assert r.n_val == 6
    assert "purple" in caplog.text


@pytest.mark.slow
def test_resume_after_kill(labelled: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck.safetensors"
    slow = ("import time, embedder.learn.finetune.train as f; orig = f.evaluate; "
            "f.evaluate = lambda *a, **k: (time.sleep(1.0), orig(*a, **k))[1]; "
            "from embedder.cli import main; main()")
    args = ["finetune", str(labelled), "--out", str(ck), "--backbone", "tiny_test", "--epochs", "5",
            "--batch-size", "8", "--workers", "0", "--lr-head", "0.05", "--patience", "10"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resume_file = tmp_path / "ck.safetensors.resume"
    deadline = time.time() + 120
    epoch = 0
    while time.time() < deadline and epoch < 2:
        time.sleep(0.1)
        if resume_file.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(resume_file), framework="pt") as f:
                    epoch = json.loads(f.metadata()["state"])["epoch"]
            except Exception:  # noqa: BLE001 - caught mid-rename
                pass
    proc.kill()
    proc.wait()
    assert 2 <= epoch < 5
    # --resume continues the same run only: other settings or other classes are a one-line error
    other_lr = [a if a != "0.05" else "0.01" for a in args]
    bad = subprocess.run([sys.executable, "-m", "embedder", *other_lr, "--resume"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "lr_head=0.05" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    more = tmp_path / "more"
    shutil.copytree(labelled, more)
    make_images(more / "yellow", {"": 16}, seed=5)
    bad = subprocess.run([sys.executable, "-m", "embedder", args[0], str(more), *args[2:], "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "classes" in bad.stderr, bad.stderr
    r = subprocess.run([sys.executable, "-m", "embedder", *args, "--resume", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["epochs_run"] == 5
    assert [h["epoch"] for h in data["history"]] == [1, 2, 3, 4, 5]
    assert not resume_file.exists()
    # Resuming restores weights, optimizer state and RNG streams: the same run as never killed.
    straight = tmp_path / "straight.safetensors"
    r2 = subprocess.run([sys.executable, "-m", "embedder", *args[:3], str(straight), *args[4:], "--json"],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    ref = json.loads(r2.stdout)
    assert [h["train_loss"] for h in data["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                       rel=1e-5)
    a, _ = checkpoint.load(ck)
    b, _ = checkpoint.load(straight)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_warmup_cosine_schedule_per_step() -> None:
    """torch's SequentialLR(LinearLR, CosineAnnealingLR) gives exactly linear warm-up then cosine
    to 0, per group, and fast-forwarding (resume) lands on the same values."""
    import math

    from embedder.learn.finetune.schedule import phase_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.0, "base_lr": 0.1},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.0, "base_lr": 0.01}])
    total, warmup = 20, 4
    sched = phase_scheduler(opt, total, warmup)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()

    def expected(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    for s, (a, b) in enumerate(seen):
        assert a == pytest.approx(0.1 * expected(s), rel=1e-6, abs=1e-12)
        assert b == pytest.approx(0.01 * expected(s), rel=1e-6, abs=1e-12)
    phase_scheduler(opt, total, warmup, done=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(seen[7][0], rel=1e-9)


def test_lp_ft_starts_from_the_probe_and_never_ends_below_it(labelled: Path, tmp_path: Path) -> None:
    """Epoch 0 is the frozen probe (the head starts as the probe); when every epoch is worse, the
    checkpoint keeps the probe head on the untouched backbone and the CLI says so."""
    ck = tmp_path / "ck.safetensors"
    ruin = FinetuneOptions(**{**TINY.__dict__, "epochs": 2, "head_epochs": 0, "lr_head": 50.0,
                              "lr_backbone": 50.0, "label_smoothing": 0.0})
    r = finetune([str(labelled)], ck, ruin)
    assert r.best_epoch == 0 and r.best_val_accuracy == pytest.approx(r.frozen_val_accuracy)
    assert max(h.val_accuracy for h in r.history) < r.best_val_accuracy  # the recipe really was worse
    state, meta = checkpoint.load(ck)
    assert meta["best_epoch"] == 0
    before = get_backbone("tiny_test").build_architecture().state_dict()
    for k, v in before.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)  # pretrained backbone kept
    r2 = finetune([str(labelled)], tmp_path / "probe-only.safetensors",
                  FinetuneOptions(**{**TINY.__dict__, "epochs": 1, "freeze_backbone": True, "lr_head": 1e-9}))
    probe_head, _ = checkpoint.load(tmp_path / "probe-only.safetensors")
    torch.testing.assert_close(state["fc.weight"], probe_head["fc.weight"], rtol=1e-5, atol=1e-6)
    assert r2.frozen_val_accuracy == pytest.approx(r.frozen_val_accuracy)
    out = runner.invoke(app, ["finetune", str(labelled), "--out", str(tmp_path / "c2.safetensors"),
                              "--backbone", "tiny_test", "--epochs", "1", "--head-epochs", "0", "--workers", "0",
                              "--batch-size", "8", "--lr-head", "50", "--lr-backbone", "50"])
    assert out.exit_code == 0, out.output
    assert "fine-tuning did not help at this budget: use the probe" in out.output
    # ... and says what was tried, from the settings the run really used
    tried = " ".join(out.output.split())
    assert ("tried: test: all layers, head from the probe; AdamW lr head 50 / backbone 50, warm-up + cosine; "
            "BatchNorm frozen; no random crops, flips; batch 8, 1 epoch at 32 px") in tried, out.output
    assert meta["recipe"] == r.recipe and "lr head 50 / backbone 50" in r.recipe and "2 epochs" in r.recipe


def test_budget_plan_picks_the_largest_size_that_fits_and_the_epochs_there() -> None:
    from embedder.learn.finetune.budget import BUDGET_MAX_EPOCHS, BUDGET_MIN_EPOCHS, budget_sizes, plan_budget

    assert budget_sizes(224) == [224, 192, 160, 128, 96] and budget_sizes(32) == [32, 24, 16]
    # 1 s per training step and 0.25 s per evaluation batch at 224 px; 50 train / 10 val batches:
    # an epoch is 52.5 s, the probe 15 s, at 224 px; both scale with the pixel count
    costs = {"full": 224, "train_step_s": 1.0, "eval_step_s": 0.25, "train_steps": 50, "val_steps": 10,
             "probe_steps": 60, "head_epochs": 0}
    roomy = plan_budget(600, **costs)
    assert (roomy.image_size, roomy.epochs) == (224, 11)  # (600 - 15) // 52.5
    tight = plan_budget(120, **costs)  # 3 epochs need 172.5 s at 224, 126.7 s at 192, 88 s at 160
    assert tight.image_size == 160 and tight.epochs == int((120 - 15 * (160 / 224) ** 2) // (52.5 * (160 / 224) ** 2))
    assert tight.epochs >= BUDGET_MIN_EPOCHS and "160 px" in tight.reason
    assert plan_budget(10**6, **costs).epochs == BUDGET_MAX_EPOCHS
    smallest = plan_budget(20, **costs)  # not even 3 epochs at 96 px: the smallest size, what fits
    assert smallest.image_size == 96 and 1 <= smallest.epochs < BUDGET_MIN_EPOCHS
    with pytest.raises(FinetuneError, match="does not fit one epoch even at 96 px"):
        plan_budget(5, **costs)


def test_a_budget_sets_size_and_epochs_and_the_report_shows_accuracy_against_time(labelled: Path,
                                                                                   tmp_path: Path) -> None:
    ck = tmp_path / "ck.safetensors"
    r = finetune([str(labelled)], ck, FinetuneOptions(**{**TINY.__dict__, "budget_minutes": 0.5}))
    plan = r.budget
    assert plan is not None and plan.image_size in (32, 24, 16) and 1 <= plan.epochs
    assert r.epochs_run <= plan.epochs and len(r.history) == r.epochs_run
    _, meta = checkpoint.load(ck)
    assert meta["preprocessing"]["crop_size"] == plan.image_size and meta["budget"]["epochs"] == plan.epochs
    times = [r.probe_seconds] + [h.elapsed_s for h in r.history]
    assert r.probe_seconds > 0 and times == sorted(times)  # accuracy against time, in order
    out = runner.invoke(app, ["finetune", str(labelled), "--out", str(tmp_path / "c.safetensors"),
                              "--backbone", "tiny_test", "--budget", "0.5", "--workers", "0", "--batch-size", "8"])
    assert out.exit_code == 0, out.output
    assert "budget     0.5 min →" in out.output and "accuracy against time" in out.output and "probe" in out.output
    bad = runner.invoke(app, ["finetune", str(labelled), "--out", str(tmp_path / "d.safetensors"),
                              "--backbone", "tiny_test", "--bn", "sometimes"])
    assert bad.exit_code == 2 and "'sometimes' is not one of 'frozen', 'train', 'adapt'" in bad.output


def test_bn_policy_and_weight_ema(labelled: Path, tmp_path: Path) -> None:
    from embedder.learn.finetune.schedule import ema_avg

    base = {**TINY.__dict__, "epochs": 2, "head_epochs": 0, "probe_init": False}
    pre = get_backbone("tiny_test").build_architecture().state_dict()
    finetune([str(labelled)], tmp_path / "frozen.safetensors", FinetuneOptions(**base))
    finetune([str(labelled)], tmp_path / "train.safetensors", FinetuneOptions(**{**base, "bn": "train"}))
    frozen, _ = checkpoint.load(tmp_path / "frozen.safetensors")
    trained, meta = checkpoint.load(tmp_path / "train.safetensors")
    stats = [k for k in pre if k.endswith("running_mean")]
    assert stats
    for k in stats:  # frozen: ImageNet's statistics kept; train: moved by the batches
        torch.testing.assert_close(frozen[k], pre[k], rtol=0, atol=0)
    assert any(not torch.equal(trained[k], pre[k]) for k in stats) and "train mode" in meta["bn_policy"]
    # EMA: the warm-up keeps early averages close to the current weights, then the decay takes over
    avg = ema_avg(0.99)
    a, c = torch.zeros(3), torch.ones(3)
    assert avg(a, c, torch.tensor(0)).tolist() == pytest.approx([0.9] * 3)  # d = 1/10
    assert avg(a, c, torch.tensor(10_000)).tolist() == pytest.approx([0.01] * 3)  # d = 0.99
    assert torch.equal(avg(torch.tensor([3]), torch.tensor([7]), 5), torch.tensor([7]))  # counters copied
    r = finetune([str(labelled)], tmp_path / "ema.safetensors", FinetuneOptions(**{**base, "ema": 0.9}))
    ema_state, meta = checkpoint.load(tmp_path / "ema.safetensors")
    assert meta["ema"] == 0.9 and r.best_epoch >= 1
    plain, _ = checkpoint.load(tmp_path / "frozen.safetensors")  # same seed and data, no EMA
    assert any(not torch.allclose(ema_state[k], plain[k]) for k in plain if k.endswith("weight"))


def test_bn_adapt_estimates_the_statistics_of_the_users_images(labelled: Path, tmp_path: Path) -> None:
    """AdaBN: the first BatchNorm's running mean becomes the channel mean of the first conv's output over
    the training images (eval preprocessing), then stays frozen through training."""
    from embedder.decode.cpu import load_rgb
    from embedder.decode.decoders import normalize_batch
    from embedder.learn.finetune.data import eval_transform

    base = {**TINY.__dict__, "epochs": 1, "freeze_backbone": True, "bn": "adapt"}
    finetune([str(labelled)], tmp_path / "a.safetensors", FinetuneOptions(**base), val_source=[str(labelled)])
    state, meta = checkpoint.load(tmp_path / "a.safetensors")
    assert "AdaBN" in meta["bn_policy"] and meta["settings"]["bn"] == "adapt"
    pre = get_backbone("tiny_test").preprocessing()
    files = sorted(labelled.rglob("*.jpg"))
    assert len(files) == 48
    x = normalize_batch(torch.stack([eval_transform(pre)(load_rgb(f.read_bytes(), 10**8)) for f in files]), pre)
    net = get_backbone("tiny_test").build_architecture()
    with torch.no_grad():
        conv = net.stem[0](x)
    expected = conv.mean(dim=(0, 2, 3))
    before = net.state_dict()["stem.1.running_mean"]
    before_var = net.state_dict()["stem.1.running_var"]
    assert not torch.allclose(before, expected, atol=1e-3)  # the seeded statistics were something else
    torch.testing.assert_close(state["stem.1.running_mean"], expected, rtol=0, atol=1e-4)
    var = conv.var(dim=(0, 2, 3))
    # torch's update_bn averages batch variances: a little under the images' variance at batch 8 (pixels of one
    # image are alike), far from the seeded statistics; a class-sorted pass
    # (no shuffle) measured channel 1 at 0.06 against 0.82
    torch.testing.assert_close(state["stem.1.running_var"], var, rtol=0.2, atol=1e-3)
    assert (state["stem.1.running_var"] - var).abs().sum() < 0.2 * (before_var - var).abs().sum()


def test_cli_finetune_option_errors_are_one_line(labelled: Path, tmp_path: Path) -> None:
    for args, message in ((["--crop-scale", "0"], "--crop-scale must be in (0, 1], got 0.0"),
                          (["--ema", "1"], "--ema must be in [0, 1), got 1.0"),
                          (["--budget", "0"], "--budget must be a positive number of minutes, got 0.0")):
        out = runner.invoke(app, ["finetune", str(labelled), "--out", str(tmp_path / "c.safetensors"),
                                  "--backbone", "tiny_test", *args])
        assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output, out.output
        assert not (tmp_path / "c.safetensors").exists()


def test_read_meta_tells_unreadable_from_not_a_checkpoint(tmp_path: Path) -> None:
    from embedder.errors import WeightsUnavailable

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not safetensors at all")
    assert checkpoint.read_meta(junk) is None and not checkpoint.is_checkpoint(junk)
    with pytest.raises(WeightsUnavailable, match="cannot read"):
        checkpoint.read_meta(tmp_path)  # a folder: an I/O error, not "not a checkpoint"
    with pytest.raises(WeightsUnavailable, match="cannot read"):
        checkpoint.read_meta(tmp_path / "missing.safetensors")
