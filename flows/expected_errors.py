"""Expected errors reach the user as one message, also when they happen inside a Prefect run.

A bad params file, a missing dataset or a refused checkpoint is not a bug: the command line prints
``error: <message>`` and exits non-zero. Prefect, though, logs every failed task and flow run with
its traceback and then its final state, which repeats the message three or four times before the
command line's own line (and, under ``dvc repro``, before DVC's "failed to reproduce"). The filter
here drops exactly those run-log records for the expected error types; an unexpected error keeps
every traceback.
"""

from __future__ import annotations

import logging
import re

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# "Finished in state Failed('Task run encountered an exception DataError: ...')" (flows add a colon).
_FAILED_WITH = re.compile(r"Finished in state Failed\([\x27\x22](?:Task|Flow) run encountered an exception:? (\w+):")


class ExpectedErrorFilter(logging.Filter):
    """Drops Prefect run-log records about a failure caused by one of ``expected``."""

    def __init__(self, expected: tuple[type[BaseException], ...]):
        super().__init__()
        self.expected = expected

    def _names(self) -> set[str]:
        """The expected classes' names and their subclasses' (DataNotFoundError is a DataError)."""
        names, todo = set(), list(self.expected)
        while todo:
            cls = todo.pop()
            names.add(cls.__name__)
            todo.extend(cls.__subclasses__())
        return names

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not isinstance(exc, self.expected)
        if record.levelno < logging.ERROR:
            return True
        # The final-state record carries the exception only as text.
        message = record.getMessage()
        found = _FAILED_WITH.match(message)
        return not (found and found.group(1) in self._names())


def quiet_expected_errors(expected: tuple[type[BaseException], ...]) -> None:
    """Install the filter on Prefect's run loggers (once per process, whatever the call count)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrorFilter) and f.expected == expected for f in logger.filters):
            logger.addFilter(ExpectedErrorFilter(expected))
