/// What a POST to /v1/transfers/batch asks for, once decoded and validated: up to `itemsMax` transfers under one
/// Idempotency-Key, all or nothing (`atomic`, the default) or each on its own.
public struct BatchRequest: Sendable, Equatable {
    public static let path = "/v1/transfers/batch"
    /// Transfers in one batch, at most.
    public static let itemsMax = 1_000

    public var atomic: Bool
    /// The items, each validated as the body of POST /v1/transfers.
    public var transfers: [TransferRequest]
    /// `POST /v1/transfers/batch\n<canonical body>`: the text the idempotency fingerprint is the SHA-256 of.
    public var fingerprintText: String

    /// Decodes and validates a body: `{"atomic": bool (optional, default true), "transfers": [transfer, ...]}`.
    /// Checks go in a fixed order, so one body always gets one code: the JSON shape and unknown fields, `atomic`,
    /// `transfers` (1 to `itemsMax` of them), then item after item with the checks of POST /v1/transfers, the first
    /// failing item's problem naming it (`transfers[3]: amount must be ...`).
    public static func decode(body: [UInt8]) -> Result<BatchRequest, Problem> {
        let value: JSONValue
        switch TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        if let problem = TransferRequest.objectProblem(value, allowed: ["atomic", "transfers"]) { return .failure(problem) }
        var atomic = true
        if let flag = value["atomic"] {
            guard case .bool(let bool) = flag else { return .failure(.invalidJSON("atomic must be a boolean.")) }
            atomic = bool
        }
        guard case .array(let items)? = value["transfers"] else {
            return .failure(.invalidJSON("transfers must be an array of transfers."))
        }
        guard (1...itemsMax).contains(items.count) else {
            return .failure(.invalidBatch("transfers must hold 1 to \(itemsMax) transfers, not \(items.count)."))
        }
        var transfers: [TransferRequest] = []
        transfers.reserveCapacity(items.count)
        for (index, item) in items.enumerated() {
            guard case .object = item else {
                return .failure(.invalidJSON("transfers[\(index)] must be a JSON object."))
            }
            switch TransferRequest.decode(kind: .transfer, value: item, fingerprinted: false) {
            case .success(let transfer):
                transfers.append(transfer)
            case .failure(var problem):
                problem.detail = "transfers[\(index)]: \(problem.detail)"
                return .failure(problem)
            }
        }
        return .success(
            BatchRequest(atomic: atomic, transfers: transfers, fingerprintText: "POST \(path)\n\(value.canonicalText)"))
    }
}
