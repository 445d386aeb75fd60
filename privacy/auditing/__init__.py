"""Empirical privacy audits: lower bounds on epsilon from canaries (issue 17).

``one_run``: Steinke, Nasr and Jagielski, *Privacy Auditing with One (1) Training Run*
(NeurIPS 2023): the p-value of a number of correct membership guesses under an
(epsilon, delta)-DP null, the epsilon lower bound at a stated confidence, the best bound ``m``
canaries can give, and the bound from attack scores of included and excluded canaries.
"""
