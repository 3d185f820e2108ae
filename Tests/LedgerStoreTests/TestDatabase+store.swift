import LedgerCore
import LedgerStore
import LedgerTestSupport

extension TestDatabase {
    /// A store on a new database of its own, with every migration of the repository's `sql/` applied. Without group
    /// commit unless `options` asks for it: most tests check one request's own transaction.
    static func migratedStore(
        poolSizeMax: Int, options: LedgerStore.Options = .init(batchMax: 1)
    ) async throws -> LedgerStore {
        let pool = try await pool(poolSizeMax: poolSizeMax)
        try await Migrator.load(directory: MigratorTests.repositorySQL, logger: logger).migrate(pool: pool)
        return LedgerStore(pool: pool, options: options, logger: logger)
    }
}

extension LedgerStore {
    /// A client (through a token, as `ledger token create` makes it) with USD accounts of these ids.
    func prepare(client: String, accounts: [String], allowNegative: Bool = false) async throws {
        _ = try await createToken(client: client)
        for id in accounts {
            _ = try await putAccount(
                client: client, id: id, request: AccountRequest(currency: "USD", allowNegative: allowNegative))
        }
    }
}
