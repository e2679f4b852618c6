"""One module per pass; importing this package registers them all (see rewriter.pass_base)."""

from normopt.passes import cleanup  # noqa: F401
