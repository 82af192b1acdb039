"""What a user reads: whole lines, atomic files, and the one-line error of every command.

Launchers (horovodrun, mpirun, srun) tag each chunk a process writes; a line written in two
pieces gets the next tag in its middle. So every line goes out in one write.
"""
import argparse
import dataclasses
import math
import os
import sys
import time


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the environment): printed as one line, exit 1
    (or the subclass's `exit_code`)."""
    exit_code = 1


class SaidByRankZero(UserError):
    """An error every rank stops on and rank 0 alone prints: this rank exits 1 in silence."""


def say(text, stream=None):
    stream = stream or sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def _shows_default(action):
    """Whether --help says a flag's default after its help line: not for switches and empty
    defaults, whose help line says what they mean."""
    default = action.default
    return bool(action.help) and action.option_strings and not (
        default is None or default is False or default is argparse.SUPPRESS
        or (isinstance(default, (str, tuple)) and not default) or "%(default)" in action.help)


class ArgumentParser(argparse.ArgumentParser):
    """The entry points' parser: `python -m MODULE` as the usage, the module docstring (with its
    example) as --help, as written, every flag's default shown, and a bad flag as one line,
    'error: argument --max_steps: invalid int value: 'x' (see ... --help)'."""

    def __init__(self, description=None, module=None, **kwargs):
        if module:
            kwargs["prog"] = f"python -m {module}"
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if _shows_default(action):
            action.help += " (default: %(default)s)"
        return action

    def error(self, message):
        say(f"error: {message} (see {self.prog} --help)", sys.stderr)
        sys.exit(2)


def option(default, help, minimum=None, **argparse_options):
    """A field of a config record that is also the command-line flag --FIELD: its default and
    help line live here once (add_options makes the flag, from_options the record). A number
    below `minimum` is refused as a bad flag."""
    metadata = {"help": help, **argparse_options}
    if minimum is not None:
        metadata["minimum"] = minimum
    return dataclasses.field(default=default, metadata=metadata)


def _at_least(convert, minimum):
    def parse(text):
        value = convert(text)
        if not math.isfinite(value):  # nan passes every comparison; inf is no duration
            raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got '{text}'")
        return value
    parse.__name__ = convert.__name__  # argparse names the type in its 'invalid int value' line
    return parse


def add_options(parser, record):
    """A flag for each option() field of the dataclass `record`: a bool is a switch, any other
    default gives the flag's type unless the option names one."""
    for field in dataclasses.fields(record):
        if "help" not in field.metadata:
            continue
        options = dict(field.metadata)
        minimum = options.pop("minimum", None)
        if isinstance(field.default, bool):
            options["action"] = "store_true"
        else:
            options.setdefault("type", type(field.default))
            if minimum is not None:
                options["type"] = _at_least(options["type"], minimum)
        parser.add_argument(f"--{field.name}", default=field.default, **options)


def from_options(record, args):
    """The `record` of parsed flags."""
    return record(**{field.name: getattr(args, field.name) for field in dataclasses.fields(record)
                     if "help" in field.metadata})


def run_main(body):
    """Runs an entry point's body; a UserError becomes 'error: ...' on stderr and exit status 1."""
    try:
        body()
    except SaidByRankZero:
        return 1
    except UserError as err:
        say(f"error: {err}", sys.stderr)
        return err.exit_code
    return 0


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Meter:
    """Progress of long work (a download, a count over the corpus, a full-softmax evaluation) as
    whole lines at most every `every` seconds: how far, how fast, and when it will be done."""

    def __init__(self, label, total, unit, scale=1.0, every=10.0, report=None):
        self.label, self.total, self.unit, self.scale, self.every = label, total, unit, scale, every
        self.report = report or say
        self.started = self.last = time.monotonic()

    def update(self, done):
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        number = "{:,.0f}" if self.scale == 1.0 else "{:,.1f}"
        text = f"{self.label}: {number.format(done / self.scale)}"
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else 0.0
            text += (f"/{number.format(self.total / self.scale)} {self.unit} ({100.0 * done / self.total:.0f}%) | "
                     f"{number.format(rate / self.scale)} {self.unit}/s | eta {format_seconds(max(eta, 0.0))}")
        else:
            text += f" {self.unit} | {number.format(rate / self.scale)} {self.unit}/s"
        self.report(text)


def write_atomically(path, content):
    """Writes `path` so that a reader (or a crash at any moment) sees the old file or the new one,
    never a part: a temporary file beside it, flushed to disk, then renamed over it."""
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        with open(temporary, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
