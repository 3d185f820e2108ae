import ArgumentParser
import LedgerClient

// The client commands: one call each, through LedgerClient, retried safely under one Idempotency-Key.

extension LedgerCommand {
    struct Credit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/credits: money from @world into an account, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @OptionGroup var move: AccountMoveOptions

        func run() async throws {
            let body = Components.Schemas.CreditRequest(
                account: move.account, amount: move.amount, currency: move.currency, metadata: try move.metadata.value())
            try await client.send { api, key in
                try await api.postCredit(headers: .init(idempotencyKey: key, ifMatch: move.ifMatch.header), body: .json(body))
            }
        }
    }

    struct Debit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/debits: money from an account out to @world, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @OptionGroup var move: AccountMoveOptions

        func run() async throws {
            let body = Components.Schemas.DebitRequest(
                account: move.account, amount: move.amount, currency: move.currency, metadata: try move.metadata.value())
            try await client.send { api, key in
                try await api.postDebit(headers: .init(idempotencyKey: key, ifMatch: move.ifMatch.header), body: .json(body))
            }
        }
    }

    struct Transfer: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/transfers: money between two accounts, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @Option(name: .customLong("from"), help: "The paying account.") var from: String
        @Option(name: .customLong("to"), help: "The paid account.") var to: String
        @Option(name: .customLong("amount"), help: "Minor units (cents).") var amount: Int64
        @Option(name: .customLong("currency"), help: "Three upper-case letters.") var currency: String
        @OptionGroup var metadata: MetadataOption
        @OptionGroup var ifMatch: IfMatchOption

        func run() async throws {
            let body = Components.Schemas.TransferRequest(
                from: from, to: to, amount: amount, currency: currency, metadata: try metadata.value())
            try await client.send { api, key in
                try await api.postTransfer(
                    headers: .init(idempotencyKey: key, ifMatch: ifMatch.header), body: .json(body))
            }
        }
    }

    struct Hold: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/holds: set money aside to capture or void later, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @Option(name: .customLong("from"), help: "The paying account.") var from: String
        @Option(name: .customLong("to"), help: "The paid account (default: @world).") var to: String?
        @Option(name: .customLong("amount"), help: "Minor units (cents).") var amount: Int64
        @Option(name: .customLong("currency"), help: "Three upper-case letters.") var currency: String
        @Option(name: .customLong("expires-in-s"), help: "Seconds until the hold expires (default: the service's, 604800).")
        var expiresInS: Int64?
        @OptionGroup var metadata: MetadataOption
        @OptionGroup var ifMatch: IfMatchOption

        func run() async throws {
            let body = Components.Schemas.HoldRequest(
                from: from, to: to, amount: amount, currency: currency, expiresInS: expiresInS,
                metadata: try metadata.value())
            try await client.send { api, key in
                try await api.postHold(headers: .init(idempotencyKey: key, ifMatch: ifMatch.header), body: .json(body))
            }
        }
    }
}

/// The flags of a credit or a debit: one client account, and the money.
struct AccountMoveOptions: ParsableArguments {
    @Option(name: .customLong("account"), help: "The account credited or debited.") var account: String
    @Option(name: .customLong("amount"), help: "Minor units (cents).") var amount: Int64
    @Option(name: .customLong("currency"), help: "Three upper-case letters.") var currency: String
    @OptionGroup var metadata: MetadataOption
    @OptionGroup var ifMatch: IfMatchOption
}

extension LedgerCommand {
    struct Capture: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/holds/{id}/capture: move a pending hold's money, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @Option(name: .customLong("hold"), help: "The hold's id.") var hold: String
        @Option(name: .customLong("amount"), help: "Minor units to capture (default: the hold's whole amount).")
        var amount: Int64?
        @OptionGroup var metadata: MetadataOption

        func run() async throws {
            let body = Components.Schemas.CaptureRequest(amount: amount, metadata: try metadata.value())
            try await client.send { api, key in
                try await api.captureHold(path: .init(id: hold), headers: .init(idempotencyKey: key), body: .json(body))
            }
        }
    }

    // Not named `Void`, which would hide Swift's inside LedgerCommand.
    struct VoidHold: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "void",
            abstract: "POST /v1/holds/{id}/void: release a pending hold, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @Option(name: .customLong("hold"), help: "The hold's id.") var hold: String

        func run() async throws {
            try await client.send { api, key in
                try await api.voidHold(path: .init(id: hold), headers: .init(idempotencyKey: key), body: .json(.init()))
            }
        }
    }

    struct Reverse: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "POST /v1/transfers/{id}/reversals: refund a transfer, retried safely under one key.")

        @OptionGroup var client: ClientOptions
        @Option(name: .customLong("transfer"), help: "The id of the transfer to reverse.") var transfer: String
        @Option(name: .customLong("amount"), help: "Minor units to reverse (default: what is left to reverse).")
        var amount: Int64?
        @OptionGroup var metadata: MetadataOption

        func run() async throws {
            let body = Components.Schemas.ReversalRequest(amount: amount, metadata: try metadata.value())
            try await client.send { api, key in
                try await api.postReversal(path: .init(id: transfer), headers: .init(idempotencyKey: key), body: .json(body))
            }
        }
    }
}
