"""`tm4 lab`: the namespaces story, its timeline, and Asterisk's side simulated (sim/).

May import every package but tm4.cli.
"""
