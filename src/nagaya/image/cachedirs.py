"""Which image caches a process may trust, checked on every open (the run path's fast lookup included).

A user's cache may live where others can create names first (`cache_dir = "/var/tmp/nagaya-${USER}"` on a
node): whoever makes that directory first could put an image under the victim's tag. So the user's cache
must be a directory of the user's own, writable by the user alone, on a path nobody else can change; a
site's shared caches must be writable only by root (their admins fill them as root). Stdlib and safefs
only: this runs before every `nagaya run`.
"""

from __future__ import annotations

import os
import sys

from nagaya import safefs
from nagaya.errors import ImageError


def own_cache(root: str) -> bool:
    """True if the user's cache exists and is theirs alone; False if it does not exist yet (it is made,
    and checked, on first write); ImageError if it exists and is not theirs."""
    try:
        safefs.private_dir(root)
    except FileNotFoundError:
        return False
    except (OSError, safefs.UnsafePath) as e:
        if not os.path.lexists(root):
            return False
        raise ImageError(f"image cache {root} is not a directory owned by you and writable by you alone "
                         f"({safefs.describe(e)}); remove it or set [image] cache_dir") from None
    return True


def shared_caches(dirs: list[str]) -> list[str]:
    """The configured shared caches that only root can write; any other is skipped with a warning."""
    out = []
    for d in dirs:
        if not d:
            continue
        try:
            os.close(safefs.open_dir(d))
        except FileNotFoundError:
            continue
        except (OSError, safefs.UnsafePath) as e:
            print(f"nagaya: warning: shared image cache {d} skipped: {safefs.describe(e)}", file=sys.stderr)
            continue
        out.append(d)
    return out
