"""One module per pass; importing this package registers them all (see rewriter.pass_base)."""

from normopt.passes import canonicalize_norms, cleanup, fold_affine_norms, preln_to_rmsnorm  # noqa: F401
