"""Each method as tasks, and their results as cells: the tasks (eval, unlearn, retrain,
gradients, EK-FAC), the workbench a task runs on, the evaluation points of a trajectory, and
each method's plan. Imports only `compute` and `inputs`."""
