"""Training drafts: data, training-time test, cached features, target-written answers, distillation."""
