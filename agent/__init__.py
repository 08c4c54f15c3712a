"""gitops-agent: a pull-based GitOps agent for bare-metal and VM hosts."""

__version__ = "0.1.0"
