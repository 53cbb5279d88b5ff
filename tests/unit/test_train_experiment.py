"""The large-batch experiment's arms and table (the runs themselves are `pyddl train`)."""

import argparse

from pyddl.train.experiment import arms, command_for, format_table


def test_arms_follow_the_linear_scaling_rule():
    small, a, b, c = arms(warmup_epochs=5)
    assert [x.global_batch for x in (small, a, b, c)] == [32, 256, 256, 256]
    assert [x.lr(0.4) for x in (small, a, b, c)] == [0.4, 0.4, 3.2, 3.2]
    assert [x.warmup_epochs for x in (small, a, b, c)] == [0, 0, 0, 5]


def test_each_run_is_a_pyddl_train_command_at_its_global_batch():
    args = argparse.Namespace(workers=2, epochs=30, base_lr=0.4)
    cmd = command_for(arms(5)[3], 1, args, "runs/x/c-seed1")
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[:2] == ["pyddl", "train"]
    assert (flags["-np"], flags["--batch-size"], flags["--base-batch"]) == ("2", "128", "32")
    assert (flags["--warmup-epochs"], flags["--seed"], flags["--base-lr"]) == ("5", "1", "0.4")


def test_table_has_means_per_seed_values_and_differences():
    runs = [{"arm": k, "seed": s, "test_top1": v, "steps": 10}
            for k, vals in {"small": (0.99, 0.97), "a": (0.90, 0.92), "b": (0.5, 0.6),
                            "c": (0.98, 0.98)}.items() for s, v in zip((0, 1), vals)]
    table = format_table({"settings": {"base_lr": 0.4, "warmup_epochs": 5, "seeds": [0, 1]},
                          "runs": runs}).splitlines()
    assert table[0].startswith("| run | global batch | peak lr |") and "mean of 2" in table[0]
    assert table[2] == "| batch 32 (reference) | 32 | 0.4 | 0 | 10 | 98.00% | 99.00, 97.00 |  |"
    assert table[3].endswith("| 91.00% | 90.00, 92.00 | -7.00 |")
    assert table[4].startswith("| batch 256, linear scaling | 256 | 3.2 | 0 |")
    assert table[5].endswith("| 98.00% | 98.00, 98.00 | +0.00 |")
