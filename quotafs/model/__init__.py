"""The pure model of a filesystem's space: the ledger, what blocks cost, the fault rules."""
