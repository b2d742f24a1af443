"""`tune`: which remedy fits a model, measured on the user's images under the user's budget."""

from aa_deploy.tune.rule import Budget, Delta, Row, Rule
from aa_deploy.tune.search import Images, Tried, Trying, Tuned, tune

__all__ = ["Budget", "Delta", "Images", "Row", "Rule", "Tried", "Trying", "Tuned", "tune"]
