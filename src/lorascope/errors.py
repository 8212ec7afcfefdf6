"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

import difflib


def first_line(err: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]


class InputError(Exception):
    """Bad config, bad data or a bad path: the message says what is wrong and where."""


class Diverged(Exception):
    """Training loss became NaN or inf; the run is recorded as `diverged`, the study goes on."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step = step
        self.loss = loss


def did_you_mean(name: str, valid) -> str:
    """The hint after an unknown name: the closest valid one, or the list of them."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
