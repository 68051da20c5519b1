"""One module per stage (``registry.STAGES`` lists them). Empty on purpose: a Ray worker that runs one
stage's task imports that stage's module only, not every stage and its models."""
