"""Stand-in for modules.errors: prints like the webui and records what was reported."""
import sys
import traceback

recorded: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    recorded.append(message)
    print("*** " + message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: Exception, task, *, full_traceback=False):
    recorded.append(f"{task}: {type(e).__name__}: {e}")
    print(f"*** Error {task}: {type(e).__name__}: {e}", file=sys.stderr)


def display_once(e: Exception, task):
    display(e, task)
