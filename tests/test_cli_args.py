"""experiments/cli_args.py: token counts as the benchmarks take them, and the one-line error a
bad one gives through each `sh2 bench` command."""

import argparse

import pytest

from experiments import bench_ops, bench_train, cli_args, profile_train


@pytest.mark.parametrize("text,count", [("4096", 4096), ("8K", 8192), ("8k", 8192),
                                        (" 32K ", 32768), ("1M", 1 << 20), ("3", 3)])
def test_token_count(text, count):
  assert cli_args.token_count(text) == count


@pytest.mark.parametrize("text", ["0", "0K", "-8", "4x", "K", "", "8.5K", "1G"])
def test_token_count_refuses(text):
  with pytest.raises(ValueError, match="not a positive token count"):
    cli_args.token_count(text)


def test_parse_lengths_exits_with_one_line(capsys):
  parser = argparse.ArgumentParser(prog="probe")
  assert cli_args.parse_lengths(parser, "--lengths", "4K, 8192,") == [4096, 8192]
  assert cli_args.parse_lengths(parser, "--long", "", allow_empty=True) == []
  for text in ("4q", ""):
    with pytest.raises(SystemExit):
      cli_args.parse_lengths(parser, "--lengths", text)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("probe: error: --lengths") and "such as 4096,8K,1M" in error


@pytest.mark.parametrize("main,argv", [
    (bench_ops.main, ["--lengths", "4k,0"]),
    (bench_ops.main, ["--lengths", "64", "--long", "128K,big"]),
    (bench_train.main, ["--lengths", "8q"]),
    (profile_train.main, ["--lengths", "-1"]),
])
def test_benchmarks_refuse_bad_lengths(main, argv, capsys):
  with pytest.raises(SystemExit):
    main(argv)
  assert "give comma-separated token counts such as 4096,8K,1M" in capsys.readouterr().err
