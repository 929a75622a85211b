"""What the command-line tools share: a usage error is one line on stderr and exit status 2.

A command raises ``UsageError`` for anything the user can fix by changing the command line
(an unknown name, a device this machine lacks, a path it cannot write); ``python -m
fastnorm`` prints it as ``fastnorm <command>: <message>`` and exits 2, with no traceback.
"""
import os


class UsageError(Exception):
    pass


def check_writable(path, what):
    """Raises UsageError unless ``path`` can be written: its directory exists and takes a
    new file, and the path is not a directory. Checked before a long run, not after it;
    an existing file is left as it is, and a probe file is removed again."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {what} to {path}: no directory {parent}")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {what} to {path}: it is a directory")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as e:
        raise UsageError(f"cannot write {what} to {path}: {e.strerror}") from None
    if not existed:
        os.remove(path)
