import Hummingbird
import LedgerCore
import LedgerStore
import Logging

/// `GET /health`: 200 when the database answers, else 503 database-unavailable with Retry-After.
extension LedgerAPI {
    func health(_ call: RouteCall) async throws -> Response {
        do {
            try await store.ping()
        } catch let error as LedgerStoreError {
            // Whatever the store's code: a database that does not answer `SELECT 1` is unavailable to this service.
            logger.warning("health check failed", metadata: ["error": "\(error)"])
            throw Problem.databaseUnavailable(retryAfterSeconds: error.retryAfterSeconds ?? options.retryAfterSeconds)
        }
        return .json(status: 200, body: "{\"status\":\"ok\"}")
    }
}
