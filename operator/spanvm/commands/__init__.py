"""The `spanvm` commands that act on SpanningVMs through the API server, kubectl style: the
kubeconfig's context and namespace, `-n`, `--context`, `-A`, `-o`, one-line errors."""
