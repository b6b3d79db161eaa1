"""Shared by the `megatron-lite train` tests: the one error line of a refused run, a run's log.dir."""


def one_error_line(capsys) -> str:
    """stderr of a refused run: one ``error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def args_dir(args: list[str]) -> str:
    """The run directory the last ``log.dir=`` override names."""
    return next(a.split("=", 1)[1] for a in reversed(args) if a.startswith("log.dir="))
