"""Errors a user can cause: the CLI prints their message (which names the key and the fix) and exits 2."""


class UserError(ValueError):
  """A bad config, flag, workdir or input file; never a bug in rcm-jax."""
