#ifndef LEDGER_CLIBPQ_SHIM_H
#define LEDGER_CLIBPQ_SHIM_H
#include <libpq-fe.h>

// Character macros from postgres_ext.h are not imported into Swift; re-declare the ones we read.
static const int LEDGER_PG_DIAG_SQLSTATE = 'C';
static const int LEDGER_PG_DIAG_MESSAGE_PRIMARY = 'M';
static const int LEDGER_PG_DIAG_MESSAGE_DETAIL = 'D';
static const int LEDGER_PG_DIAG_MESSAGE_HINT = 'H';
static const int LEDGER_PG_DIAG_CONSTRAINT_NAME = 'n';
#endif
