"""Accuracy of builds against the torch fp32 reference: metrics, data, reports and gates."""
