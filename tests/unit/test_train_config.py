"""TrainConfig: defaults, flags round trip, and every validation message."""

import argparse
import dataclasses
import json

import pytest

from pyddl.train.config import (
    ALLREDUCE_ALGORITHMS, COMPRESSIONS, TrainConfig, add_train_arguments, config_from_args,
)


def parse(argv):
    from pyddl.cli.train import build_parser

    return config_from_args(build_parser(argparse.ArgumentParser(prog="pyddl train")).parse_args(argv))


def test_defaults_are_the_digits_run():
    cfg = TrainConfig()
    assert (cfg.workers, cfg.model, cfg.data) == (2, "small_cnn", "digits")
    assert cfg.global_batch_at(0) == 64
    recipe = cfg.make_recipe(1437)
    assert recipe.at(0, 0) == (pytest.approx(0.1 * 64 / 256), 64)
    assert recipe.steps_in_epoch(0) == 22
    assert parse([]) == cfg


def test_every_flag_reaches_the_config():
    cfg = parse([
        "-np", "4", "--model", "resnet50", "--data", "/data/imagenet", "--epochs", "90",
        "--batch-size", "64", "--base-lr", "0.2", "--base-batch", "512", "--warmup-epochs", "3",
        "--decay", "step", "--milestones", "30,60,80", "--gamma", "0.2", "--optimizer", "lars",
        "--momentum", "0.8", "--weight-decay", "5e-5", "--lars-eta", "0.002",
        "--label-smoothing", "0.1", "--allreduce", "multiring", "--topology", "2x2",
        "--compression", "fp16", "--stop-after-epoch", "45",
        "--checkpoint-dir", "/ck", "--keep-checkpoints", "5", "--resume", "--seed", "7",
        "--out", "/runs/a", "--max-steps-per-epoch", "3", "--synthetic-size", "500",
        "--synthetic-classes", "10", "--image-size", "128", "--loader-workers", "4",
        "--device", "cpu", "--log-every", "2.5",
    ])
    assert cfg == TrainConfig(
        workers=4, model="resnet50", data="/data/imagenet", epochs=90, batch_size=64,
        base_lr=0.2, base_batch=512, warmup_epochs=3.0, decay="step", milestones=(30, 60, 80),
        gamma=0.2, optimizer="lars", momentum=0.8, weight_decay=5e-5, lars_eta=0.002,
        label_smoothing=0.1, allreduce="multiring", topology="2x2", compression="fp16",
        stop_after_epoch=45, checkpoint_dir="/ck",
        keep_checkpoints=5, resume=True, seed=7, out="/runs/a", max_steps_per_epoch=3,
        synthetic_size=500, synthetic_classes=10, image_size=128, loader_workers=4,
        device="cpu", log_every_s=2.5)
    assert cfg.global_batch_at(0) == 256
    assert parse(["--nesterov"]).nesterov is True


def test_job_flags_are_pyddl_runs_and_training_flags_add_none_of_their_own():
    job = argparse.ArgumentParser()
    from pyddl.cli.run import add_job_flags

    add_job_flags(job)
    train = argparse.ArgumentParser()
    add_train_arguments(train)
    job_opts = {o for a in job._actions for o in a.option_strings} - {"-h", "--help"}
    train_opts = {o for a in train._actions for o in a.option_strings} - {"-h", "--help"}
    assert {"-np", "--allreduce", "--topology"} <= job_opts
    assert not job_opts & train_opts
    # Only the training flags (a namespace without job flags) keep the job defaults.
    only_train = config_from_args(train.parse_args(["--epochs", "3"]))
    assert (only_train.workers, only_train.allreduce, only_train.epochs) == (2, None, 3)


def test_batch_ramp_flag_and_api_agree():
    cfg = parse(["-np", "4", "--batch-ramp", "0:64,2:128", "--epochs", "4"])
    assert cfg.batch_ramp == ((0, 64), (2, 128))
    assert cfg == TrainConfig(workers=4, epochs=4, batch_ramp="0:64,2:128")
    assert [cfg.global_batch_at(e) for e in range(4)] == [64, 64, 128, 128]
    recipe = cfg.make_recipe(1000)
    assert recipe.at(2, 0)[1] == 128 and recipe.steps_in_epoch(2) == 7


def test_bad_ramp_flag_keeps_its_message(capsys):
    with pytest.raises(SystemExit):
        parse(["--batch-ramp", "3:64"])
    assert "batch ramp must start at epoch 0" in capsys.readouterr().err


def test_warmup_default_follows_goyal_capped_by_run_length():
    assert TrainConfig(epochs=90).effective_warmup_epochs == 5.0
    assert TrainConfig(epochs=8).effective_warmup_epochs == 2.0
    assert TrainConfig(epochs=8, warmup_epochs=0).effective_warmup_epochs == 0.0


@pytest.mark.parametrize("kw, message", [
    (dict(workers=0), "-np must be >= 1 worker"),
    (dict(model=""), "--model is empty"),
    (dict(data=""), "--data is empty"),
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(batch_size=0), r"--batch-size \(per worker\) must be >= 1"),
    (dict(batch_size=32, batch_ramp="0:64"), "--batch-size and --batch-ramp are both set"),
    (dict(batch_ramp="0:64,2:129"), r"--batch-ramp batches \[129\] are not divisible by 2"),
    (dict(base_lr=0.0), "--base-lr must be > 0"),
    (dict(base_batch=0), "--base-batch must be >= 1"),
    (dict(warmup_epochs=6.0), r"--warmup-epochs must be in \[0, --epochs=5\]"),
    (dict(decay="exp"), "--decay must be one of none, step, cosine"),
    (dict(decay="step"), "--decay step needs --milestones, e.g. --milestones 1,3,4"),
    (dict(decay="step", milestones=(3, 2)), r"--milestones must increase strictly within 1..4"),
    (dict(decay="step", milestones=(5,)), r"--milestones must increase strictly within 1..4"),
    (dict(milestones=(2,)), "--milestones only apply with --decay step"),
    (dict(gamma=0.0), r"--gamma must be in \(0, 1\]"),
    (dict(optimizer="adam"), "--optimizer must be one of sgd, lars"),
    (dict(optimizer="lars", nesterov=True), "--nesterov works with --optimizer sgd only"),
    (dict(momentum=1.0), r"--momentum must be in \[0, 1\)"),
    (dict(nesterov=True, momentum=0.0), "--nesterov needs --momentum > 0"),
    (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
    (dict(lars_eta=0.0), "--lars-eta must be > 0"),
    (dict(label_smoothing=1.0), r"--label-smoothing must be in \[0, 1\)"),
    (dict(allreduce="ring"), "--allreduce must be one of native, multiring, auto"),
    (dict(topology="2x2"), r"world size 2 does not match topology 2x2"),
    (dict(stop_after_epoch=6), r"--stop-after-epoch must be in 1..--epochs=5"),
    (dict(compression="int8"), "--compression must be one of none, fp16, bf16"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be >= 1"),
    (dict(resume=True), "--resume needs to know where the checkpoints are"),
    (dict(seed=-1), "--seed must be >= 0"),
    (dict(max_steps_per_epoch=0), "--max-steps-per-epoch must be >= 1"),
    (dict(synthetic_size=0), "--synthetic-size and --synthetic-classes must be >= 1"),
    (dict(image_size=0), "--image-size must be >= 1"),
    (dict(loader_workers=-1), "--loader-workers must be >= 0"),
    (dict(device="tpu"), "--device must be one of auto, cpu, cuda"),
    (dict(log_every_s=-1.0), "--log-every must be >= 0 seconds"),
    (dict(batch_ramp="1:64"), "batch ramp must start at epoch 0"),
])
def test_validation_messages(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(epochs="5"), "TrainConfig.epochs must be an int, got '5'"),
    (dict(epochs=5.0), "TrainConfig.epochs must be an int"),
    (dict(resume=1), "TrainConfig.resume must be a bool"),
    (dict(batch_size=True), "TrainConfig.batch_size must be an int"),
    (dict(base_lr="0.1"), "TrainConfig.base_lr must be a number"),
    (dict(model=None), "TrainConfig.model must be a string"),
    (dict(milestones=3), "TrainConfig.milestones must be a sequence"),
])
def test_type_errors(kw, message):
    with pytest.raises(TypeError, match=message):
        TrainConfig(**kw)


def test_resume_with_a_location_is_fine():
    assert TrainConfig(resume=True, out="runs/a").resume
    assert TrainConfig(resume=True, checkpoint_dir="ck").resume


def test_frozen_and_serialisable():
    cfg = TrainConfig(batch_ramp="0:64,2:128", decay="step", milestones=[3, 4], epochs=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig(**d) == cfg


def test_choices_match_the_core():
    # The trainer offers what the core runs: every registered algorithm and every codec.
    from pyddl.comm.codecs import CODECS
    from pyddl.comm.registry import ALGORITHMS

    assert set(ALLREDUCE_ALGORITHMS) == {*ALGORITHMS, "auto"}
    assert set(COMPRESSIONS) == set(CODECS)
