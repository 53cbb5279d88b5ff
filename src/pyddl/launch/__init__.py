"""Starting workers: the local launcher, built on torchrun's elastic agent."""

from pyddl.launch.local import LaunchError, RunConfig, launch

__all__ = ["RunConfig", "launch", "LaunchError"]
