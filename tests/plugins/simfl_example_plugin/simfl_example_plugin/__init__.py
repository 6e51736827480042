"""Example simfl plugins, installed as their own distribution: simfl finds them through entry points."""
