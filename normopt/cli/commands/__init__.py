"""One module per command; importing this package registers them all on the app."""

from normopt.cli.commands import (  # noqa: F401
    build,
    inspect,
    passes,
    profile,
    recalibrate,
    rewrite,
    verify,
)
