"""SIP admission by secret domain: a REGISTER addressed to a secret name admits its source."""
