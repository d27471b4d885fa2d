"""PNG figures that let a person check each stage's output by eye."""
