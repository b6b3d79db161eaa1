"""Shared by the e2e tests: the one error line of a refused command (train, convert...), a run's log.dir."""


def one_error_line(capsys) -> str:
    """stderr of a refused command: one ``error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def args_dir(args: list[str]) -> str:
    """The run directory the last ``log.dir=`` override names."""
    return next(a.split("=", 1)[1] for a in reversed(args) if a.startswith("log.dir="))
