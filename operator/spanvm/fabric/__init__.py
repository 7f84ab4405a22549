"""The memory fabric: page-granular coherent guest memory across fragment processes."""
