"""Tools around the recipe: CPU and GPU benchmarks, publishing a trained model, the internals
figure. The recipe (run.sh, local/) does not need them."""
