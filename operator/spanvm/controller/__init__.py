"""The operator: turns SpanningVMs into placed VMFragments and reports how they run."""
