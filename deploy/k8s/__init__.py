"""Kubernetes: the Helm chart's values derived from the pipeline spec, and the offline schemas its check validates against."""
