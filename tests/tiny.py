"""The tiny models, dataset and job of the fast tests: they live in the package (reprolora.models.tiny), where
`reprolora reprotest --quick` finds them too."""

from reprolora.models.tiny import *  # noqa: F401,F403
