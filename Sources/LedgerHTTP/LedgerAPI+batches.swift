import Hummingbird
import LedgerCore
import LedgerStore

/// `POST /v1/transfers/batch`: up to 1,000 transfers under one Idempotency-Key, all or nothing or each on its own.
extension LedgerAPI {
    func postBatch(_ call: RouteCall) async throws -> Response {
        let (key, _, keyWait) = try keyedRequest(call, ifMatch: false)
        let batch = try BatchRequest.decode(body: call.body).get()
        let answered = try await store.postBatchAnswer(client: call.client, key: key, batch: batch, keyWait: keyWait)
        if case .executed(let status, let body) = answered.outcome {
            LedgerMetrics.batchItems(Self.itemOutcomes(status: status, body: body, batch: batch))
        }
        return try answer(answered, trace: call.trace)
    }

    /// What the items of a batch executed now came to: succeeded and failed items, and those an atomic batch rolled
    /// back because another item failed.
    static func itemOutcomes(status: Int, body: String, batch: BatchRequest) -> (succeeded: Int, failed: Int, rolledBack: Int) {
        let count = batch.transfers.count
        guard status == 201 else { return (0, 1, count - 1) }
        guard !batch.atomic, let value = try? JSONParser.parse(Array(body.utf8)), case .array(let results)? = value["results"]
        else { return (count, 0, 0) }
        let succeeded = results.count { if case .number("201")? = $0["status"] { true } else { false } }
        return (succeeded, results.count - succeeded, 0)
    }
}
