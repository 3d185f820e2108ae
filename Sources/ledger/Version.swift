/// The version of Ledger, printed by `ledger --version`. The one place it is written: change it here for a release.
let ledgerVersion = "0.2.0"
